"""Optional libraries, imported when a command needs them, with the extra that installs them."""

from __future__ import annotations

import importlib
from types import ModuleType

from imgfeat.errors import UsageError

_EXTRAS = {"faiss": "search", "fastapi": "serve", "uvicorn": "serve", "multipart": "serve"}
_PACKAGES = {"faiss": "faiss-cpu", "multipart": "python-multipart"}


def need(module: str) -> ModuleType:
    """Import `module`, or say in one line which extra of imgfeat brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = _EXTRAS.get(module, "search")
        raise UsageError(f"this needs {_PACKAGES.get(module, module)}: "
                         f"pip install 'imgfeat[{extra}]'") from None
