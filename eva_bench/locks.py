"""File locks for artifacts that many runs share (pretrained backbones, generated datasets, lr selections).

    with exclusive(cache / "backbone.lock"):
        if not valid(path):
            build(path)           # one process builds; the others wait here, then find it built

An advisory ``fcntl`` lock: released when the block ends or the holding process dies, so a killed sweep leaves no
stale lock. Local file systems only; on NFS ``flock`` may not be shared between nodes (issue 6 checks that).
"""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path


@contextlib.contextmanager
def exclusive(path: str | Path):
    """Hold an exclusive lock on ``path`` (created, with its folder, if missing) for the duration of the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
