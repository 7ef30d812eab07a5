"""manifest.json: what an output folder holds, and whether a new run may add to it."""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata

from imgfeat.errors import UsageError
from imgfeat.store.layout import Layout, write_atomic

FORMAT = 1
# The settings that decide what a feature means; a run that differs in any is refused.
# "precision" is the precision the features were computed in. How it was chosen (on a CPU,
# bf16's agreement with fp32 at start) is "precision_check", outside the identity: a worker
# that continues a store takes the recorded precision rather than checking again
# (compute/precision.py), so a rerun is never refused for what the check would say today.
IDENTITY_FIELDS = ("sources", "model", "weights", "layers", "pool", "gem_p", "scales", "whiten",
                   "l2", "preprocess", "precision", "dtype", "shard_size")

# What a worker knows of the identity, and each shard records as a digest ("identity", an
# attribute of the file): the meaning of its features. Where the items come from and how
# they are cut into shards are the plan's business.
SHARD_IDENTITY_FIELDS = tuple(f for f in IDENTITY_FIELDS if f not in ("sources", "shard_size"))


def identity_digest(identity: dict) -> str:
    """The digest of the feature-defining fields of a manifest or of a worker's identity."""
    fields = json.loads(json.dumps({f: identity.get(f) for f in SHARD_IDENTITY_FIELDS}))
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def software_versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("imgfeat", "torch", "torchvision", "timm", "pillow", "h5py", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def read_manifest(layout: Layout) -> dict | None:
    if not layout.manifest.exists():
        return None
    try:
        manifest = json.loads(layout.manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{layout.manifest} is unreadable ({exc}); "
                         "use --overwrite to start this output folder again") from None
    if manifest.get("format") != FORMAT:
        raise UsageError(f"{layout.root} holds store format {manifest.get('format')!r}; "
                         f"this imgfeat reads format {FORMAT}")
    return manifest


def write_manifest(layout: Layout, manifest: dict) -> None:
    layout.root.mkdir(parents=True, exist_ok=True)
    write_atomic(layout.manifest, json.dumps(manifest, indent=1).encode())


def identity_conflicts(recorded: dict, wanted: dict) -> list[str]:
    """'field: recorded -> wanted' for each identity field that differs."""
    conflicts = []
    for field in IDENTITY_FIELDS:
        old, new = recorded.get(field), wanted.get(field)
        if json.loads(json.dumps(old)) != json.loads(json.dumps(new)):
            conflicts.append(f"{field}: {_short(old)} -> {_short(new)}")
    return conflicts


def _short(value) -> str:
    if isinstance(value, dict) and "spec" in value:
        return value["spec"]
    if isinstance(value, dict) and "kind" in value:
        return value.get("path") or value["kind"]
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
