"""requirements.lock: every dependency pyproject.toml declares is pinned there, and the environment the tests run
in is the one the lock describes (what `make test` installs), so two fresh machines build the same one."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"requirements.lock: {line!r} is not pinned with =="
            pins[normalized(name)] = version
    return pins


def declared() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return [normalized(re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0]) for r in requirements]


def test_lock_pins_every_declared_dependency():
    pins = lock()
    assert [name for name in declared() if name not in pins] == []
    assert pins["torch"] == "2.13.0" and pins["ray"] == "2.60.0"


def test_this_environment_is_the_locked_one():
    installed = {normalized(d.metadata["Name"]): d.version.split("+")[0] for d in metadata.distributions()}
    differs = {name: (version, installed.get(name)) for name, version in lock().items() if installed.get(name) != version}
    assert differs == {}, f"(locked, installed) differ; rebuild with `make setup` or refresh with `make lock`: {differs}"
