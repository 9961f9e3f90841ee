"""What "better" means for a run, a trial or a rung: a reported metric and whether more or less of it wins.

The one rule behind a run's best epoch (`train.metric` / `train.mode`), a stage's ranking of its trials and its
promotion candidates, synchronous halving's rungs, the console's best trial and the report's tables: a value that
is not a finite number (NaN, missing, a diverged run) is never better than one that is and always ranks last,
and ties keep their order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

Item = TypeVar("Item")
MODES = ("max", "min")


def finite(value: Any) -> bool:
    """A real number (not a bool, not NaN or infinite)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class Objective:
    metric: str
    """Reported metric, e.g. val_overlap_acc."""
    mode: str = "max"
    """max or min."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'max' or 'min', got {self.mode!r}")

    def value(self, row: Mapping[str, Any] | None) -> float:
        """The metric in a row of metrics as a float; NaN when it is missing or not a finite number."""
        value = (row or {}).get(self.metric)
        return float(value) if finite(value) else math.nan

    def better(self, value: float | None, than: float | None) -> bool:
        """Whether `value` beats `than` (a non-finite value never does; anything finite beats a non-finite one)."""
        if not finite(value):
            return False
        if not finite(than):
            return True
        return value > than if self.mode == "max" else value < than

    def ranked(self, items: Iterable[Item], value: Callable[[Item], Any] | None = None) -> list[Item]:
        """`items` best first by `value(item)` (default: the metric of each item, a row of metrics); non-finite
        values last; ties keep their order."""
        key = value or self.value

        def order(item: Item) -> tuple[bool, float]:
            v = key(item)
            if not finite(v):
                return True, 0.0
            return False, -float(v) if self.mode == "max" else float(v)

        return sorted(items, key=order)

    def best(self, items: Iterable[Item], value: Callable[[Item], Any] | None = None) -> Item | None:
        """The best item with a finite value, or None when none has one."""
        key = value or self.value
        ranked = self.ranked(items, key)
        return ranked[0] if ranked and finite(key(ranked[0])) else None

    @property
    def worst(self) -> float:
        """A value every finite one beats (a diverged trial's score at a rung)."""
        return -math.inf if self.mode == "max" else math.inf
