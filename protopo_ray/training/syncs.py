"""Counting the host syncs of a training step: the reads that make the host wait for the device.

On CUDA, `torch.cuda.set_sync_debug_mode("warn")` makes every synchronising CUDA call warn, and
`count_syncs` counts those warnings: the real figure. On CPU nothing waits, but the same code makes the same
reads, so a `TorchFunctionMode` counts the calls that would synchronise on CUDA: scalar reads (`.item()`,
`float()`, `int()`, `bool()`, use as an index or size), `.tolist()` / `.numpy()` / `.cpu()`, and ops whose output size
depends on tensor values (`nonzero`, boolean-mask indexing, `masked_select`, `bincount`, `unique`,
`repeat_interleave`). Reads of the optimiser's step counters are left out: torch keeps them on the host on
CUDA too (unless `capturable` / `fused`), so reading them never waits. The CPU count is a structural one: it
sees calls made from Python, not ones inside torch's C++ (none of which sync in the ops a step uses here; the
CUDA count on a GPU is what settles it).
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

_SCALAR_READS = {"item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy", "cpu"}
_SIZE_FROM_VALUES = {"nonzero", "argwhere", "masked_select", "bincount", "unique", "unique_consecutive",
                     "repeat_interleave"}


class SyncCount:
    """What `count_syncs` saw: `total`, and per call name (`by_call`) where it can tell."""

    def __init__(self) -> None:
        self.by_call: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_call.values())


def _bool_index(args: tuple) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


class _HostReads(TorchFunctionMode):
    def __init__(self, count: SyncCount, host_side: Callable[[torch.Tensor], bool]) -> None:
        super().__init__()
        self.count, self.host_side = count, host_side

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _SCALAR_READS and args and isinstance(args[0], torch.Tensor):
            if not self.host_side(args[0]):
                self.count.by_call[name] += 1
        elif name in _SIZE_FROM_VALUES:
            if not (name == "repeat_interleave" and (kwargs or {}).get("output_size") is not None):
                self.count.by_call[name] += 1
        elif name == "__getitem__" and _bool_index(args):
            self.count.by_call["bool_index"] += 1
        return func(*args, **(kwargs or {}))


def optimizer_steps(optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor], bool]:
    """True for the optimiser's per-parameter step counters (host tensors on CUDA too), for `count_syncs`."""

    def is_step(tensor: torch.Tensor) -> bool:
        return any(tensor is state.get("step") for state in optimizer.state.values())

    return is_step


@contextlib.contextmanager
def count_syncs(device: torch.device, host_side: Callable[[torch.Tensor], bool] = lambda _: False) -> Iterator[SyncCount]:
    """Count the host syncs inside the block: CUDA's own sync warnings on a CUDA device, else the calls that
    would synchronise there (module docstring). `host_side(tensor)`: reads of such tensors are not counted on
    CPU (tensors that stay on the host on CUDA too, e.g. `optimizer_steps`)."""
    count = SyncCount()
    if device.type == "cuda":
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield count
            finally:
                torch.cuda.set_sync_debug_mode(previous)  # first: synchronize() itself would be counted
                torch.cuda.synchronize(device)
        count.by_call["cuda"] = sum("synchronizing" in str(w.message) for w in caught)
        return
    with _HostReads(count, host_side):
        yield count
