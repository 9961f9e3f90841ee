"""The package's shape: no import cycle, subpackages importing only those below them, no function-local import of
the package's own modules without a comment why, and the Ray-free core importing with Ray made unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tools import import_graph

REPO = Path(__file__).resolve().parents[1]


def test_no_module_or_subpackage_cycle_and_imports_point_down():
    graph = import_graph.build()
    assert graph.cycles() == []
    assert graph.layering_violations() == []
    subpackages = {graph.subpackage(m) for m in graph.modules} - {""}
    assert subpackages == set(import_graph.LAYERS)
    # The entry points stay at the top, thin: python -m protopo_ray.<verb>
    top = {m.rsplit(".", 1)[-1] for m in graph.modules if graph.subpackage(m) == "" and m != "protopo_ray"}
    assert top == {"prepare", "train", "tune", "predict", "report"}


def test_every_deferred_import_of_the_package_says_why():
    graph = import_graph.build()
    assert [f"{i.module}:{i.line}" for i in graph.local if not i.commented] == []


def test_the_graph_sees_a_cycle_and_an_upward_import(tmp_path):
    """The checker itself: a made-up package with both faults."""
    package = tmp_path / "protopo_ray"
    for name, text in {"__init__.py": "", "data/__init__.py": "", "model/__init__.py": "",
                       "data/a.py": "from protopo_ray.model import b\n",
                       "model/b.py": "def f():\n    from protopo_ray.data import a\n"}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    graph = import_graph.build(tmp_path)
    assert graph.cycles() == [["protopo_ray.data.a", "protopo_ray.model.b"]]
    assert graph.layering_violations() == ["data -> model points up the layers " + str(import_graph.LAYERS)]
    assert [(i.module, i.commented) for i in graph.local] == [("protopo_ray.model.b", False)]


def test_the_core_and_the_bare_gpu_entry_points_import_without_ray():
    """A GPU box with torch and PyG but no Ray runs `train --local` and `predict`; the report needs no Ray either."""
    graph = import_graph.build()
    modules = sorted(m for m in graph.modules if graph.subpackage(m) in import_graph.RAY_FREE)
    modules += ["protopo_ray.train", "protopo_ray.predict", "protopo_ray.prepare", "protopo_ray.report"]
    script = textwrap.dedent(f"""
        import importlib, sys

        class NoRay:
            def find_spec(self, name, path=None, target=None):
                if name == "ray" or name.startswith("ray."):
                    raise ImportError(f"{{name}}: Ray is not installed here")

        sys.meta_path.insert(0, NoRay())
        for name in {modules!r}:
            importlib.import_module(name)
        assert not any(m == "ray" or m.startswith("ray.") for m in sys.modules)
        print(len({modules!r}))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.strip()) == len(modules) > 40
