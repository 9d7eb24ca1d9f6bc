"""File helpers with no peftjax dependencies (usable from every package)."""

from __future__ import annotations

import contextlib
import json
import os


def write_json(path: str, obj) -> None:
    """``obj`` as JSON at ``path``, written atomically (a temporary file, then a rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


@contextlib.contextmanager
def cache_lock(path: str):
    """Holds an exclusive lock on ``path`` (created if needed) for the block: processes that
    prepare the same cache entry (a converted checkpoint, a prepared dataset) take turns, so
    the second finds the first one's result instead of writing over it while it is read (two
    test workers, the processes of a multi-host run). A no-op where ``fcntl`` is missing."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
