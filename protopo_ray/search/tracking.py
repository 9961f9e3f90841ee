"""Experiment tracking with Weights & Biases: one W&B run per Tune trial, grouped by experiment and stage.

W&B runs offline unless the user has configured an API key (WANDB_API_KEY, or a login in ~/.netrc): a
machine without network must never hang on a login prompt or an upload.

The runs live in Ray actors whose output Ray forwards to the driver: unless `verbose`, they are silent (no
banner, no run summary per trial) and leave the actors' console uncaptured. The settings travel with each
`wandb.init` call, since environment variables set in the driver after `ray.init` never reach the actors.

The API key never travels through Ray. Ray's own `WandbLoggerCallback` copies WANDB_API_KEY into its logging
actors' `runtime_env` env_vars, which Ray stores in the GCS and shows on the dashboard and in its logs
(ray-project/ray#28276, #39502). `wandb_callbacks` builds a subclass that starts those actors without it: they
run on the driver's node (Ray pins them there) and read the key from ~/.netrc on that node, from the node's own
environment, or, when only the driver process holds the key, from a file in the temp directory that only this
user can read and that is deleted when the stage ends. docs/cloud.md shows how the key gets onto the head.
"""

from __future__ import annotations

import functools
import netrc
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

API_KEY_ENV = "WANDB_API_KEY"


def has_wandb_credentials() -> bool:
    if os.environ.get(API_KEY_ENV):
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


def write_private_key_file(key: str) -> Path:
    """The key in a new file only this user can read (mkstemp creates it with mode 0600)."""
    fd, name = tempfile.mkstemp(prefix="protopo-wandb-", suffix=".key")
    with os.fdopen(fd, "w") as f:
        f.write(key)
    return Path(name)


def warn_if_key_in_job_runtime_env() -> None:
    """Say so when the job itself was submitted with the key in its runtime_env (the GCS already holds it)."""
    try:
        import ray

        if not ray.is_initialized():  # never start or join a cluster just to look
            return
        env_vars = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
    except Exception:  # no Ray session, or a runtime context without a runtime_env: nothing to check
        return
    if API_KEY_ENV in env_vars:
        warnings.warn(f"{API_KEY_ENV} was passed in the job's runtime_env env_vars: Ray stores it in the GCS and "
                      "shows it on the dashboard. Put it on the head instead (`wandb login` there, or a secret "
                      "store read at node start: docs/cloud.md, 'W&B'), and rotate this key.", stacklevel=2)


@functools.cache
def logger_callback_class() -> type:
    """Ray's WandbLoggerCallback whose logging actors never get the API key through runtime_env."""
    from ray.air.integrations.wandb import WandbLoggerCallback, _WandbLoggingActor

    class KeyFileLoggingActor(_WandbLoggingActor):
        def __init__(self, *args, api_key_file: str | None = None, **kwargs):
            # Same node as the driver that wrote the file (Ray pins the logging actors to the driver's node).
            if api_key_file and not os.environ.get(API_KEY_ENV):
                os.environ[API_KEY_ENV] = Path(api_key_file).read_text().strip()
            super().__init__(*args, **kwargs)

    class PrivateKeyWandbLoggerCallback(WandbLoggerCallback):
        _logger_actor_cls = KeyFileLoggingActor

        def setup(self, *args, **kwargs):
            super().setup(*args, **kwargs)
            key = os.environ.get(API_KEY_ENV)
            online = self.kwargs.get("mode", wandb_mode()) not in ("offline", "disabled")
            self.key_file = str(write_private_key_file(key)) if key and online else None

        def _start_logging_actor(self, trial, exclude_results, **wandb_init_kwargs):
            # Ray reads the key from os.environ into the actor class's runtime_env here: hide it for the call.
            key = os.environ.pop(API_KEY_ENV, None)
            try:
                super()._start_logging_actor(trial, exclude_results, api_key_file=getattr(self, "key_file", None),
                                             **wandb_init_kwargs)
            finally:
                if key is not None:
                    os.environ[API_KEY_ENV] = key

        def on_experiment_end(self, trials, **info):
            try:
                super().on_experiment_end(trials, **info)
            finally:
                self.remove_key_file()

        def remove_key_file(self) -> None:
            if getattr(self, "key_file", None):
                Path(self.key_file).unlink(missing_ok=True)
                self.key_file = None

        def __del__(self):
            self.remove_key_file()
            super().__del__()

    return PrivateKeyWandbLoggerCallback


def wandb_callbacks(*, enabled: bool, project: str, experiment: str, stage: str, log_dir: Path,
                    verbose: bool = False) -> list:
    """Ray Tune logger callbacks: a W&B run per trial (config + every reported metric), or none."""
    if not enabled:
        return []
    mode = wandb_mode()
    # The logging actors of a local cluster started after this inherit the driver's environment: pin the mode.
    os.environ["WANDB_MODE"] = mode
    if not verbose:
        os.environ.setdefault("WANDB_SILENT", "true")
    if mode == "online":
        warn_if_key_in_job_runtime_env()
    log_dir.mkdir(parents=True, exist_ok=True)
    extra = {} if verbose else {"settings": quiet_settings()}
    return [logger_callback_class()(project=project, group=f"{experiment}/{stage}", job_type=stage, mode=mode,
                                    dir=str(log_dir), tags=[experiment, stage], **extra)]
