"""What ties an index to the store it was built from: the features' identity, when the store
was made, and each committed shard's name and size. Shards are immutable once committed, so
any change that adds, replaces or removes rows (`--incremental`, `--overwrite`) changes it;
copying the folder elsewhere does not."""

from __future__ import annotations

import hashlib
import json

from imgfeat.store.manifest import IDENTITY_FIELDS


def fingerprint(store) -> str:
    manifest = store.manifest
    shards = [(index, store.layout.shard_size(index)) for index in store.shards]
    described = {"identity": {field: manifest.get(field) for field in IDENTITY_FIELDS},
                 "created": manifest.get("created"), "shards": shards}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]
