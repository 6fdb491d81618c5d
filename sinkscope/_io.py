"""Atomic file writes: a Ctrl-C or a full disk never leaves a half-written output file behind.

Each file is written to a hidden temporary file in the same directory (so ``os.replace`` is a rename on one
file system), flushed to disk, then renamed over the target. Temporary files are removed on any failure,
``KeyboardInterrupt`` included; those of a writer killed outright (SIGKILL) are removed by the next write of
the same file once they are old enough not to be a write in progress.
"""

from __future__ import annotations

import glob
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path

TMP_SUFFIX = ".tmp"
STALE_SECONDS = 600  # a temporary file this old is a leftover of a killed writer (SIGKILL runs no cleanup)


def temp_path_for(path: Path) -> Path:
    """A fresh hidden temporary name next to ``path`` (``.report.json.1a2b3c4d.tmp``)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def _write_temp(path: Path, text: str) -> Path:
    tmp = temp_path_for(path)
    # O_EXCL: never follow or clobber something already there; mode 0o666 lets the umask decide, like open().
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: readers see the old file or the new one, never a part."""
    return atomic_write_many({path: text})[0]


def atomic_write_many(files: Mapping[str | Path, str]) -> list[Path]:
    """Write several files so that none is left half-written: all are staged to temporary files first, and
    only when every one is complete are they renamed into place (one quick rename each)."""
    staged: list[tuple[Path, Path]] = []
    for path in files:
        _remove_stale(Path(path))
    try:
        for path, text in files.items():
            target = Path(path)
            staged.append((_write_temp(target, text), target))
        for tmp, target in staged:
            os.replace(tmp, target)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    return [target for _, target in staged]


def _remove_stale(path: Path) -> None:
    """Remove temporary files of ``path`` left by a writer that was killed (older than :data:`STALE_SECONDS`:
    a younger one may belong to a write in progress)."""
    now = time.time()
    try:
        leftovers = list(path.parent.glob(f".{glob.escape(path.name)}.*{TMP_SUFFIX}"))
    except OSError:
        return
    for tmp in leftovers:
        try:
            if now - tmp.stat().st_mtime > STALE_SECONDS:
                tmp.unlink()
        except OSError:
            pass
