"""Experiment tracking with Weights & Biases: one W&B run per Tune trial, grouped by experiment and stage.

W&B runs offline unless the user has configured an API key (WANDB_API_KEY, or a login in ~/.netrc): a
machine without network must never hang on a login prompt or an upload.

The runs live in Ray actors whose output Ray forwards to the driver: unless `verbose`, they are silent (no
banner, no run summary per trial) and leave the actors' console uncaptured. The settings travel with each
`wandb.init` call, since environment variables set in the driver after `ray.init` never reach the actors.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode() -> str:
    """The explicit WANDB_MODE if set, else online with credentials and offline without."""
    return os.environ.get("WANDB_MODE") or ("online" if has_wandb_credentials() else "offline")


def quiet_settings() -> dict[str, Any]:
    """`wandb.init(settings=...)` for runs nobody watches on a console: no output, no console capture."""
    return {"silent": True, "console": "off"}


def wandb_callbacks(*, enabled: bool, project: str, experiment: str, stage: str, log_dir: Path,
                    verbose: bool = False) -> list:
    """Ray Tune logger callbacks: a W&B run per trial (config + every reported metric), or none."""
    if not enabled:
        return []
    from ray.air.integrations.wandb import WandbLoggerCallback

    mode = wandb_mode()
    # The logging actors of a local cluster started after this inherit the driver's environment: pin the mode.
    os.environ["WANDB_MODE"] = mode
    if not verbose:
        os.environ.setdefault("WANDB_SILENT", "true")
    log_dir.mkdir(parents=True, exist_ok=True)
    extra = {} if verbose else {"settings": quiet_settings()}
    return [WandbLoggerCallback(project=project, group=f"{experiment}/{stage}", job_type=stage, mode=mode,
                                dir=str(log_dir), tags=[experiment, stage], **extra)]
