"""File locks for what many runs share (pretrained backbones, generated datasets, lr selections, run records).

    with exclusive(cache / "backbone.lock"):
        if not valid(path):
            build(path)           # one process builds; the others wait here, then find it built

An advisory ``flock``: released when the block ends or the holding process dies, so a killed sweep leaves no stale
lock. Across the nodes of a cluster the lock is only as good as the shared file system's: Linux passes ``flock`` on
NFS to the server (which arbitrates between nodes) unless the mount keeps locks on the node (``local_lock=flock``,
``local_lock=all``, ``nolock``), Lustre shares it only when mounted with ``flock`` (``localflock``: node-local; neither:
refused). Inside a SLURM job a lock on such a mount is an error (``node_local_reason``): jobs on other nodes would not
see it and could build one artifact, or train one record, at the same time.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import time
from pathlib import Path

from . import distributed

MOUNTS = Path("/proc/self/mounts")  # this process's mount table: device, mount point, type, options
ALLOW_NODE_LOCAL = "EVA_BENCH_NODE_LOCAL_LOCKS"  # =1: every job runs on this one node, node-local locks suffice
POLL_SECONDS = 5.0  # a torchrun job waiting for a lock re-checks it this often (far below any collective timeout)


def hold(path: str | Path, waiting: str | None = None):
    """Open ``path`` (created, with its folder, if missing) and hold an exclusive lock on it until the returned file
    is closed. ``waiting`` is printed when another process holds the lock and this one has to wait."""
    handle = _open(path)
    if not _try_lock(handle, path):
        if waiting:
            print(waiting, flush=True)
        _lock(handle, path, fcntl.LOCK_EX)
    return handle


def hold_for_job(path: str | Path, waiting: str | None = None):
    """``hold`` for a whole torchrun job, called by every rank: rank 0 takes the lock and the other ranks wait with
    it. Waiting re-checks the lock every POLL_SECONDS, each check a broadcast, so that no rank sits in a collective
    long enough to reach the process group's timeout (a wait behind another job can last as long as its run).
    Returns the lock's file on rank 0 (close it to release) and None on the others; in one process, ``hold``."""
    if not distributed.is_distributed():
        return hold(path, waiting)
    handle = _open(path) if distributed.rank() == 0 else None
    held = handle is not None and _try_lock(handle, path)
    if handle is not None and not held and waiting:
        print(waiting, flush=True)
    while not distributed.from_rank0(held):
        time.sleep(POLL_SECONDS)
        held = handle is not None and _try_lock(handle, path)
    return handle


def exclusive(path: str | Path):
    """Hold an exclusive lock on ``path`` for the duration of the block."""
    return _held(hold(path))


def exclusive_for_job(path: str | Path):
    """``exclusive`` for a whole torchrun job (``hold_for_job``): every rank enters the block once rank 0 holds it."""
    return _held(hold_for_job(path))


@contextlib.contextmanager
def _held(handle):
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # closing the file releases the lock


def _open(path: str | Path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_shared(path.parent)
    return open(path, "a")


def _try_lock(handle, path: str | Path) -> bool:
    """Take the lock if it is free (True); False when another process holds it."""
    try:
        _lock(handle, path, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _lock(handle, path: str | Path, operation: int) -> None:
    """``flock``; a file system that refuses locks closes ``handle`` and raises a clear error."""
    try:
        fcntl.flock(handle, operation)
    except BlockingIOError:
        raise  # held elsewhere: the caller decides whether to wait
    except OSError as error:
        handle.close()
        if error.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
            raise OSError(error.errno, f"the file system under {Path(path).parent} refuses file locks "
                          f"({error.strerror}); put results_dir and EVA_BENCH_CACHE on one that supports flock "
                          "(Lustre: mount with -o flock; NFSv3: a running lockd)") from error
        raise


def check_shared(folder: Path) -> None:
    """Inside a SLURM job, raise when locks in ``folder`` would bind only this node (unless ALLOW_NODE_LOCAL is set)."""
    if not os.environ.get("SLURM_JOB_ID") or os.environ.get(ALLOW_NODE_LOCAL):
        return
    reason = node_local_reason(folder)
    if reason:
        raise RuntimeError(
            f"file locks under {folder} bind only this node ({reason}), so jobs on other nodes could build the same "
            "shared artifact or train the same record at once. Put results_dir and EVA_BENCH_CACHE on a file system "
            "whose locks are shared between nodes (NFS without local_lock, Lustre mounted with -o flock), or set "
            f"{ALLOW_NODE_LOCAL}=1 when every job of the sweep runs on this one node."
        )


def node_local_reason(folder: str | Path) -> str | None:
    """Why an ``flock`` in ``folder`` would not be seen by other nodes (its mount's type and options), or None."""
    mount = _mount_of(str(Path(folder).resolve()), _mount_table())
    if mount is None:
        return None
    point, fstype, options = mount
    where = f"{fstype} mount {point}"
    if fstype.startswith("nfs"):
        if "nolock" in options or options.get("local_lock") in ("flock", "all"):
            kept = "nolock" if "nolock" in options else f"local_lock={options['local_lock']}"
            return f"{where} with {kept}"
    elif fstype == "lustre" and "localflock" in options:
        return f"{where} with localflock"
    return None


def _mount_table() -> list[tuple[str, str, dict]]:
    """(mount point, type, options) for every mount; empty where there is no mount table (not Linux)."""
    try:
        lines = MOUNTS.read_text().splitlines()
    except OSError:
        return []
    table = []
    for line in lines:
        fields = line.split()
        if len(fields) < 4:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])  # a space is written \040
        options = dict(option.partition("=")[::2] for option in fields[3].split(","))
        table.append((point, fields[2], options))
    return table


def _mount_of(path: str, table) -> tuple[str, str, dict] | None:
    """The mount that holds ``path``: the longest mount point it lies under (the last one mounted there wins)."""
    best = None
    for point, fstype, options in table:
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fstype, options)
    return best
