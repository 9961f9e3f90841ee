"""What a search may spend: the `[budget]` table of an experiment, in wall-clock hours and US dollars.

    [budget]
    max_hours = 12.0     # wall-clock hours of the search's stages (a --resume counts the finished stages' time)
    max_usd = 250.0      # dollars: measured trial device-hours x the stage plan's price (results.TrialRecord.cost)
    node_wait_s = 900    # a node type the stage's pool needs that has not come up after this long is named

Every key is optional; a limit left out is no limit. The search (protopo_ray.search.run) starts no stage once a
limit is reached or a stage has stopped on it; while a stage runs, protopo_ray.search.guard stops starting trials
when the next epoch would exceed a limit. Pure module: no Ray.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from protopo_ray.config.run import reject_unknown_keys


def _positive(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@dataclass(kw_only=True, frozen=True, slots=True)
class BudgetConfig:
    max_hours: float | None = None
    """Wall-clock hours the search's stages may run in all (None: no limit)."""
    max_usd: float | None = None
    """US dollars the search's trials may spend in all, at the stage plans' prices (None: no limit)."""
    node_wait_s: float = 900.0
    """Seconds into a stage after which a node type its pool needs and that has not come up (quota, capacity, a
    launch error) is named on the console, while trials wait for it."""

    def __post_init__(self) -> None:
        for name in ("max_hours", "max_usd"):
            value = getattr(self, name)
            if value is not None and not _positive(value):
                raise ValueError(f"[budget] {name} must be a number > 0 (leave it out for no limit), got {value!r}")
        if not _positive(self.node_wait_s):
            raise ValueError(f"[budget] node_wait_s must be a number of seconds > 0, got {self.node_wait_s!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "[budget]") -> BudgetConfig:
        if not isinstance(values, Mapping):
            raise ValueError(f"{where}: must be a table, got {values!r}")
        reject_unknown_keys(cls, values, where)
        try:
            return cls(**values)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None

    @property
    def max_wall_s(self) -> float | None:
        return None if self.max_hours is None else self.max_hours * 3600

    @property
    def bounded(self) -> bool:
        return self.max_usd is not None or self.max_hours is not None

    def exceeded(self, usd: float, wall_s: float) -> str | None:
        """The limit `usd` spent and `wall_s` run reach ("usd" or "wall"), None while both are within it."""
        if self.max_usd is not None and usd >= self.max_usd:
            return "usd"
        if self.max_wall_s is not None and wall_s >= self.max_wall_s:
            return "wall"
        return None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: Mapping[str, Any] | None) -> BudgetConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in names})
