"""A process's peak memory, split into what it owns and what it maps from shared memory.

`getrusage`'s peak RSS counts every resident page a process has touched, including pages of Ray's object
store (shared memory, mmapped into every worker that reads a block zero-copy). A streaming worker touches
new object-store pages as the stream moves on, so its RSS peak grows with the data read although the store
itself is bounded and shared. What a worker really holds is its anonymous memory (`RssAnon`: heap, tensors,
Arrow buffers it copied); Linux keeps no peak of it, so a daemon thread samples /proc/self/status.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import resource
import threading
from dataclasses import asdict, dataclass

_FIELDS = {"RssAnon:": "anon", "RssShmem:": "shmem", "RssFile:": "file"}


@dataclass(slots=True)
class MemoryPeaks:
    rss_bytes: int = 0
    """Peak resident set (getrusage / VmHWM): everything, shared pages included."""
    anon_bytes: int = 0
    """Peak anonymous (private) memory, sampled."""
    shmem_bytes: int = 0
    """Peak resident shared memory (Ray's object store pages, /dev/shm), sampled."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def current() -> dict[str, int]:
    """RssAnon / RssShmem / RssFile of this process now, in bytes (zeros where /proc is unavailable)."""
    out = dict.fromkeys(_FIELDS.values(), 0)
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                key = line.split(None, 1)[0]
                if key in _FIELDS:
                    out[_FIELDS[key]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


class MemoryWatch:
    """Samples this process's memory every `interval_s` in a daemon thread; `peaks()` at any time."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self._peaks = MemoryPeaks()
        self._stop = threading.Event()
        self._sample()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True, name="protopo-memwatch")
        self._thread.start()

    def _sample(self) -> None:
        now = current()
        self._peaks.anon_bytes = max(self._peaks.anon_bytes, now["anon"])
        self._peaks.shmem_bytes = max(self._peaks.shmem_bytes, now["shmem"])

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self._sample()

    def peaks(self) -> MemoryPeaks:
        self._sample()
        self._peaks.rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return MemoryPeaks(**self._peaks.as_dict())

    def stop(self) -> None:
        self._stop.set()


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_TAMED = False
#: oneDNN primitives kept (default 1,024). Measured over 1,000 steps on the 20k set with the mmap threshold:
#: private memory 397 -> 541 MB at the default, 360 -> 413 MB (flat from step 200) at 8.
ONEDNN_CACHE = 8


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def tame_allocator() -> bool:
    """Keep a long run's private memory flat under glibc malloc (a no-op elsewhere; False when not applied).

    Every batch has its own shape, so activations and collation buffers come in ever new sizes; glibc's
    heap fragments and its dynamic mmap threshold moves up, so freed buffers stay in the process. Measured on
    the 20k synthetic set (1,700 steps, tools/bench_stream.py notes): private memory grew 397 -> 743 MB and
    still rising; with buffers >= 256 KiB mmapped (returned to the OS when freed) 397 -> 555 MB, and with oneDNN's
    per-shape primitive cache capped as well 360 -> 413 MB, flat from step 200. `trim()` at epoch ends returns
    the rest of the free heap.
    """
    global _TAMED
    if _TAMED:
        return True
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt(_M_MMAP_THRESHOLD, 256 * 1024)
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 20)
    # oneDNN (the CPU LSTM) caches a primitive and its scratch memory per input shape, up to 1,024 of them;
    # bucketed batches rarely repeat a shape. Read when the first primitive is made, so before the first step.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE))
    _TAMED = True
    return True


def trim() -> None:
    """Return free heap pages to the OS (glibc malloc_trim), e.g. after an epoch."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


_WATCH: MemoryWatch | None = None


def process_watch() -> MemoryWatch:
    """The one watch of this process (started on first use; a reused Tune actor keeps it)."""
    global _WATCH
    if _WATCH is None:
        _WATCH = MemoryWatch()
    return _WATCH
