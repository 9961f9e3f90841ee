"""Config files and command lines: TOML -> `Config`, `--set section.key=value` overrides, the `[experiment]`
table, the resolved config written beside a run, and the key reference `--help` prints."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from protopo_ray.config import run
from protopo_ray.config.run import SECTIONS, Config, set_dotted
from protopo_ray.data.build import ensure_data
from protopo_ray.data.synthetic import check_mix

#: Tables an experiment file carries beside the run config: read by `ExperimentSettings` and
#: `protopo_ray.search.experiment`, ignored by a plain run (`load_config`), so one file serves both.
EXPERIMENT_TABLES = ("experiment", "stages", "prices", "budget")


@dataclass(kw_only=True, frozen=True, slots=True)
class ExperimentSettings:
    """The `[experiment]` table: what a file needs besides the run config (searches and plain runs alike)."""

    synthetic: int = 0
    """Prepare the embedded synthetic set with this many proteins where data.path holds no shards (0 = never)."""
    seed: int = 0
    """Seed of that synthetic set and of HyperOpt."""
    synthetic_mix: dict[str, float] = field(default_factory=dict)
    """Protein types of that synthetic set, relative shares, e.g. {TM = 2, BETA = 1} (empty: DeepTMHMM's)."""
    wandb_project: str = "protopo_ray"
    """W&B project the search's trials are logged to."""

    def ensure_data(self, path: str) -> dict[str, Any]:
        """The manifest at `path`, the synthetic set these settings name prepared there first if it holds none."""
        return ensure_data(path, self.synthetic, self.seed, mix=self.synthetic_mix or None)

    @classmethod
    def from_table(cls, values: Any, where: str) -> ExperimentSettings:
        """From a parsed `[experiment]` table; every error names `where` and the key."""
        if not isinstance(values, dict):
            raise ValueError(f"{where}: [experiment] must be a table, got {values!r}")
        run.reject_unknown_keys(cls, values, f"{where}: [experiment]")
        for key in ("synthetic", "seed"):
            value = values.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where}: [experiment] {key} must be an integer >= 0, got {value!r}")
        if not isinstance(values.get("wandb_project", ""), str):
            raise ValueError(f"{where}: [experiment] wandb_project must be a string, got {values['wandb_project']!r}")
        if "synthetic_mix" in values:
            check_mix(values["synthetic_mix"], f"{where}: [experiment] synthetic_mix")
        return cls(**values)

    @classmethod
    def of_file(cls, path: str | Path | None) -> ExperimentSettings:
        """The settings of a TOML file (defaults without a file or table)."""
        return cls.from_table(read_toml(path).get("experiment", {}), str(path)) if path else cls()


def parse_value(text: str) -> Any:
    """A `--set` value: TOML syntax (numbers, booleans, lists, quoted strings), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """['model.lstm_size=512', ...] -> {'model.lstm_size': 512, ...}."""
    overrides: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected section.key=value, e.g. --set model.lstm_size=512")
        overrides[key.strip()] = parse_value(text.strip())
    return overrides


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: experiment/config file not found") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: not valid TOML: {error}") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- TOML file (sections data/model/train/resources, plus `name`) <- dotted overrides."""
    values: dict[str, Any] = read_toml(path) if path else {}
    values = {k: v for k, v in values.items() if k not in EXPERIMENT_TABLES}
    for key, value in (overrides or {}).items():
        set_dotted(values, key, value, where="--set")
    return Config.from_dict(values, where=str(path) if path else "config")


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as JSON (what the run actually used)."""
    Path(path).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")


def describe_keys(sections: tuple[str, ...] | None = None, width: int = 118) -> str:
    """Every config key with its default and field docstring, for `--help` epilogs:
    `  data.batch_size = 32    Proteins per batch (per worker).` (all sections, or only `sections`).

    Field docstrings are not kept at run time (a string under a field is just an expression), so they are read
    from `protopo_ray.config.run`'s source with `ast`; slots dataclasses are fine, their fields come from `dataclasses.fields`.
    """
    try:
        tree = ast.parse(inspect.getsource(run))
    except (OSError, TypeError):  # no source shipped (a zipped or compiled install): keys and defaults only
        tree = ast.Module(body=[], type_ignores=[])
    docs: dict[str, dict[str, str]] = {name: {} for name in ("Config", *(c.__name__ for c in SECTIONS.values()))}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            fields_doc = docs.setdefault(node.name, {})
            for first, second in zip(node.body, node.body[1:]):
                if (isinstance(first, ast.AnnAssign) and isinstance(first.target, ast.Name)
                        and isinstance(second, ast.Expr) and isinstance(second.value, ast.Constant)
                        and isinstance(second.value.value, str)):
                    fields_doc[first.target.id] = " ".join(second.value.value.split())

    def default(f: dataclasses.Field) -> str:
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default
        return json.dumps(value).replace(": ", " = ") if not isinstance(value, bool) else str(value).lower()

    rows = [] if sections else [(f.name, default(f), docs["Config"].get(f.name, ""))
                                 for f in dataclasses.fields(Config) if f.name not in SECTIONS]
    for section, cls in SECTIONS.items():
        if not sections or section in sections:
            rows += [(f"{section}.{f.name}", default(f), docs[cls.__name__].get(f.name, ""))
                     for f in dataclasses.fields(cls)]
    left = max(len(f"{key} = {value}") for key, value, _ in rows) + 2
    lines = ["config keys (TOML: [section] key = value; command line: --set section.key=value):"]
    for key, value, doc in rows:
        head = f"  {key} = {value}".ljust(left + 2)
        wrapped = textwrap.wrap(doc, max(40, width - len(head))) or [""]
        lines.append(head + wrapped[0])
        lines += [" " * len(head) + more for more in wrapped[1:]]
    return "\n".join(lines)
