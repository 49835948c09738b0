"""One place that says where models and data come from.

Order: the offline data root (``EVA_BENCH_DATA``, default ``../shared/data`` beside the repository) for local assets,
the Hugging Face cache / hub for hub ids. Every miss is a clear error that names the asset and how to provide it,
raised before any training starts.

A run names the data it read: every file ``asset`` resolves inside ``files_read()`` (the recipe's recording block)
goes into the record's provenance with its SHA-256, so a record from a truncated or edited copy of a data root can be
told from one on the real files. ``check_documented_rows`` warns when a file holds fewer rows than the data root's
``SOURCES.md`` documents.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class MissingAssetError(FileNotFoundError):
    """A local asset (file or directory) is not where the data root says it should be."""


class OfflineHubError(RuntimeError):
    """A hub id was asked for while the hub cannot be reached and the id is not in the local cache."""


def data_root() -> Path:
    """The offline data root: ``$EVA_BENCH_DATA`` if set, else ``../shared/data`` next to the repository."""
    root = os.environ.get("EVA_BENCH_DATA")
    return Path(root).expanduser().resolve() if root else (REPO_ROOT.parent / "shared" / "data").resolve()


def cache_dir() -> Path:
    """Where eva_bench keeps what it builds itself (converted models, init statistics): ``$EVA_BENCH_CACHE``."""
    path = Path(os.environ.get("EVA_BENCH_CACHE", REPO_ROOT / ".cache")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def asset(relpath: str | os.PathLike, how_to_get: str = "", fallbacks: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Resolve ``relpath`` under the data root, else the first existing ``fallbacks`` path (where a system package
    installs the same files, e.g. Debian's /usr/share/datasets), or raise :class:`MissingAssetError` saying how to
    provide it."""
    path = Path(relpath)
    if not path.is_absolute():
        path = data_root() / path
    if not path.exists():
        path = next((Path(f) for f in fallbacks if Path(f).exists()), path)
    if not path.exists():
        hint = f" {how_to_get}" if how_to_get else ""
        raise MissingAssetError(
            f"missing asset {relpath!s}: looked for {path} on host {socket.gethostname()} "
            f"(EVA_BENCH_DATA={os.environ.get('EVA_BENCH_DATA', 'unset')}). Set EVA_BENCH_DATA to the offline data "
            f"root, on a cluster one every node mounts (the repository's ../shared/data; see its SOURCES.md).{hint}"
        )
    for found in _READING:
        found.add(path)
    return path


_READING: list[set] = []  # the open files_read() blocks, each collecting the assets resolved inside it
_HASHES: dict[tuple, str] = {}  # (path, size, mtime) -> SHA-256: a sweep worker hashes each file once


@contextlib.contextmanager
def files_read():
    """The set of asset paths resolved inside the block (data read through a per-process cache is resolved again
    by its caller, so every run of a sweep worker names it)."""
    found: set = set()
    _READING.append(found)
    try:
        yield found
    finally:
        _READING.remove(found)


def file_hashes(paths) -> dict[str, str]:
    """{path: SHA-256} of files (a directory's files, each)."""
    out = {}
    for path in sorted({Path(p) for p in paths}):
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                stat = file.stat()
                key = (str(file), stat.st_size, stat.st_mtime_ns)
                if key not in _HASHES:
                    _HASHES[key] = hashlib.sha256(file.read_bytes()).hexdigest()
                out[str(file)] = _HASHES[key]
    return out


def documented_rows(relpath: str) -> int | None:
    """The fewest rows the data root's SOURCES.md documents for a file (its table's ``rows`` column: "7,473", or
    "500–3,270 each" for a pattern like ``commonsense/<task>/test.json``); None when it documents no count."""
    sources = data_root() / "SOURCES.md"
    if not sources.exists():
        return None
    for line in sources.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0] or cells[0] in ("path", "---"):
            continue
        pattern = "[^/]+".join(re.escape(part) for part in re.split(r"<\w+>", cells[0]))  # <task>: any name
        number = re.match(r"[\d,]+", cells[2])
        if number and re.fullmatch(pattern, str(relpath)):
            return int(number.group().replace(",", ""))
    return None


def check_documented_rows(relpath: str, rows: int) -> None:
    """Warn when a data file holds fewer rows than SOURCES.md documents (a truncated copy trains on less, silently
    otherwise)."""
    expected = documented_rows(relpath)
    if expected is not None and rows < expected:
        warnings.warn(f"{asset(relpath)} holds {rows:,} rows, fewer than the {expected:,} its SOURCES.md documents: "
                      f"a truncated copy? Records name the file's SHA-256 under provenance.data.", stacklevel=2)


def hub_offline() -> bool:
    """True when Hugging Face hub access is switched off (``HF_HUB_OFFLINE=1``)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def local_folder(name: str, key: str = "model.load.name") -> Path | None:
    """``name`` as a local folder when it is one (a saved model: ``save_pretrained``'s output); None for a hub id.
    A name written as a path (``/``, ``./``, ``../`` or ``~`` first) that is not a folder is an error saying so, not a
    hub lookup."""
    path = Path(str(name)).expanduser()
    if path.is_dir():
        return path
    if str(name).startswith(("/", "./", "../", "~")):
        raise MissingAssetError(f"no such directory: {path} ({key} is read as a local folder because it is written "
                                f"as a path; a hub id looks like 'org/name')")
    return None


def require_hub(repo_id: str, revision: str | None = None, repo_type: str = "model") -> None:
    """Fail fast if ``repo_id`` cannot be loaded: offline and absent from the local HF cache.

    Without this, an offline ``from_pretrained`` on a missing id fails deep inside transformers (or, with the hub
    unreachable but not declared offline, hangs ~30 s per retry).
    """
    if not hub_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    probe = "config.json" if repo_type == "model" else "README.md"
    hit = try_to_load_from_cache(repo_id, probe, revision=revision, repo_type=repo_type)
    if not isinstance(hit, str):
        raise OfflineHubError(
            f"{repo_type} {repo_id!r} (revision {revision or 'main'}) is not in the local Hugging Face cache and "
            f"HF_HUB_OFFLINE=1. Download it on a machine with hub access (huggingface-cli download {repo_id}"
            f"{' --revision ' + revision if revision else ''}) or unset HF_HUB_OFFLINE."
        )
