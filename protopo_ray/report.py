"""`python -m protopo_ray.report EXP_DIR`: rebuild report.md and plots/ of an experiment directory.

The search writes the report itself when it finishes; this rebuilds it (after a partial search, or a change of
the report). Exit codes: 0 ok (prints the report's path), 2 not an experiment directory.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from protopo_ray.reporting.markdown import write_report
from protopo_ray.search.results import ExperimentError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protopo_ray.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exp_dir", type=Path, help="experiment directory written by the tuner")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.exp_dir)
    except ExperimentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
