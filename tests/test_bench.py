"""tools/bench.py's markdown: regenerating docs/benchmarks.md keeps every tagged quality row of the file."""

from __future__ import annotations

from tools import bench


def test_rewriting_the_file_carries_every_tagged_quality_row(tmp_path):
    path = tmp_path / "benchmarks.md"
    rows = ["| run a | 715 | 0.8 <!-- QUALITY --> |", "| run b, CRF | 715 | 0.7 <!-- QUALITY:crf --> |",
            "| run c, ensemble | 715 | 0.9 <!-- QUALITY:ensemble --> |"]
    path.write_text("# Benchmarks\n\nhand-written notes\n" + bench.MARKER + "\n\n" + "\n".join(rows)
                    + "\n| untagged | 1 | 0 |\n")
    meta = {"command": "x", "finished": "now", "wall_s": 1.0, "cpus": 2, "load_start": 0, "load_end": 0}
    bench.write_markdown({}, meta, path)
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written notes\n") and all(row in text for row in rows)
    assert "untagged" not in text and "| TBD" not in text
