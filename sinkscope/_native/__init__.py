"""The fused C row pass of statistics mode (``rows.c``), compiled on first use with the machine's C compiler.

Statistics mode works without it (the torch path gives the same numbers, about ten passes over each block
instead of one); this module only makes the CPU path faster. The library is built once per source, compiler
and machine into ``<cache>/native`` (:func:`sinkscope.models.cache_dir`) and loaded with ctypes; a machine
without a C compiler with OpenMP, or ``SINKSCOPE_NATIVE=0``, uses the torch path, and says so once in the log.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch  # first: the library's OpenMP reference must bind to the runtime torch has loaded

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("rows.c")
VERSION = 2  # sinkscope_rows_version() of rows.c
_RECIPE = 2  # of the build commands in _build: a change means a new library

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_why_not: str | None = None


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _flags() -> list[str]:
    """Compile flags. -ffast-math lets the compiler vectorize expf and the reductions; it is given to the
    compile step only: linked with it, the library would carry crtfastmath, which switches the loading
    thread to flush denormals to zero, for torch and everything else in the process."""
    flags = ["-O3", "-ffast-math", "-fopenmp", "-fPIC"]
    if platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64"):
        flags.append("-march=native")  # built on the machine that runs it, so its own vector units
    return flags


def _cpu_flags() -> bytes:
    """What -march=native depends on: a library built for one CPU may not run on another sharing the cache."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor().encode()
    return "\n".join(sorted({ln for ln in text.splitlines() if ln.startswith(("flags", "model name"))})).encode()


def _build(cc: str) -> Path:
    from ..models import cache_dir

    flags = _flags()
    source = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(b"\0".join([source, str(_RECIPE).encode(), " ".join(flags).encode(), version.encode(),
                                     platform.machine().encode(), _cpu_flags()])).hexdigest()[:16]
    out = cache_dir() / "native" / f"rows-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        obj, built = Path(tmp) / "rows.o", Path(tmp) / out.name
        for cmd in ([cc, *flags, "-c", str(SOURCE), "-o", str(obj)],
                    [cc, "-shared", "-fopenmp", str(obj), "-o", str(built), "-lm"]):
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise OSError(f"{cc} failed: {(res.stderr or res.stdout).strip()[-500:]}")
        os.replace(built, out)  # atomic: a concurrent process sees the whole library or none
    return out


def _load() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler (cc, gcc or clang) on PATH")
    path = _build(cc)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:  # a damaged cached library (a disk that filled up, say): build it once more
        path.unlink(missing_ok=True)
        lib = ctypes.CDLL(str(_build(cc)))
    if lib.sinkscope_rows_version() != VERSION:
        raise OSError("stale native library")
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.sinkscope_rows.restype = None
    lib.sinkscope_rows.argtypes = [ptr, ptr, i64, i64, i64, i64, ctypes.c_int, i64, i64, i64, ptr, ptr, ptr, ptr,
                                   ptr, ptr, ptr, ptr, i64, ptr, ctypes.c_int]
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded row-pass library, or None where it can't be built (see :func:`unavailable`)."""
    global _lib, _tried, _why_not
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("SINKSCOPE_NATIVE", "1") == "0":
                _why_not = "turned off by SINKSCOPE_NATIVE=0"
            else:
                try:
                    _lib = _load()
                except (OSError, subprocess.SubprocessError) as exc:
                    _why_not = str(exc)
                    log.warning("statistics mode uses its torch path (slower on the CPU): %s", exc)
            _tried = True
    return _lib


def unavailable() -> str | None:
    """Why the native row pass is not used (None when it is)."""
    library()
    return _why_not


def usable(device: torch.device | str) -> bool:
    """Whether statistics mode's blocks on ``device`` go through the native row pass (CPU tensors only)."""
    return torch.device(device).type == "cpu" and library() is not None


def describe(device: torch.device | str) -> str:
    """Which row pass statistics mode uses on ``device``, for reports."""
    if usable(device):
        return "native C (sinkscope/_native/rows.c)"
    device = torch.device(device)
    return f"torch operations (on {device.type})" if device.type != "cpu" else f"torch operations ({unavailable()})"


def rows(scores: torch.Tensor, probs: torch.Tensor, q0: int, causal: bool, t: int, k_max: int, local: int,
         first: torch.Tensor, band: torch.Tensor, entropy: torch.Tensor, received: torch.Tensor,
         pooled: torch.Tensor | None, edges: torch.Tensor | None, query_bin: torch.Tensor | None,
         threads: int, sink: torch.Tensor | None = None, sink_prob: torch.Tensor | None = None) -> None:
    """Run the fused row pass on one block; every tensor contiguous, on the CPU (see ``rows.c``).

    ``sink`` ``[heads]`` (float32): learned sink logits that join every row's softmax (gpt-oss), with
    ``sink_prob`` ``[heads, T]`` receiving each row's sink probability; both None without learned sinks.
    """
    lib = library()
    assert lib is not None
    heads, c, ld = scores.shape
    n_bins = 0 if edges is None else edges.numel() - 1

    def at(x: torch.Tensor | None) -> int | None:
        return None if x is None else x.data_ptr()

    if (sink is None) != (sink_prob is None):
        raise ValueError("sink and sink_prob go together")
    lib.sinkscope_rows(at(scores), at(probs), heads, c, ld, q0, int(causal), t, k_max, local, at(first),
                       at(band), at(entropy), at(sink), at(sink_prob), at(received), at(pooled), at(edges), n_bins,
                       at(query_bin), threads)
