"""Where Ray's, Tune's, W&B's and the libraries' output goes during a search: a log file, not the console.

Left to themselves, Ray forwards every worker's and actor's output to the driver, Tune prints a trial table
every 30 s and W&B a banner per trial; `protopo_ray.search.console` shows what a user follows instead, and
`quiet_output` files the rest in the experiment directory (`--verbose` keeps Ray's own output on the console).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import ray  # noqa: F401  (importing Ray installs its "ray" logger's stderr handler, which route_logs replaces)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def quiet_output(log_path: Path) -> Path:
    """Keep Ray's, Tune's, W&B's and the libraries' output off the console: in `log_path`, or not printed.

    Call before `ray.init` (with `log_to_driver=False`, which keeps the workers' and actors' output in Ray's
    session logs): a local cluster's processes inherit the environment set here.
    """
    # Tune's default output engine prints a box per experiment at any verbosity; the legacy one is silent at 0.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("WANDB_SILENT", "true")
    return route_logs(log_path)


def route_logs(log_path: Path) -> Path:
    """Send the driver's log records, Python warnings and native stderr (Ray's C++ core) to `log_path`.

    Python's own `sys.stderr` keeps the terminal, so an uncaught error still shows its traceback there; only
    writes to file descriptor 2 that bypass Python (Ray's core worker logs, e.g. per W&B actor "constructor
    arguments in the object store") land in the file. Call before `ray.init`: its start-up messages go there too.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    # "ray" does not propagate to the root logger; every other library's records end at the root.
    for logger in (logging.getLogger("ray"), logging.getLogger()):
        logger.handlers = [h for h in logger.handlers if not isinstance(h, logging.StreamHandler)
                           or isinstance(h, logging.FileHandler)] + [handler]
    logging.getLogger("ray").setLevel(logging.INFO)
    logging.captureWarnings(True)
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = os.dup(2)
    os.dup2(handler.stream.fileno(), 2)
    sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
    return log_path
