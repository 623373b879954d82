"""Prefect flows over dir: images, and the `dirimage` command line.

The flows are imported on first use, so `dirimage inspect` and other commands
that need no Prefect start without paying for its import.
"""

import importlib

_FLOWS = {
    "copy_image": "flows.copy",
    "verify_image": "flows.copy",
    "CopySummary": "flows.copy",
    "VerifyReport": "flows.copy",
    "ImageCorrupt": "flows.copy",
    "sync_images": "flows.sync",
    "verify_images": "flows.sync",
    "SyncSummary": "flows.sync",
    "SyncFailed": "flows.sync",
    "delete_image": "flows.delete",
}

__all__ = sorted(_FLOWS)


def __getattr__(name: str):
    module = _FLOWS.get(name)
    if module is None:
        raise AttributeError(f"module 'flows' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
