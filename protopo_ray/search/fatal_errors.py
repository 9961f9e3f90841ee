"""Trial errors that end the whole search: a fault of the cluster's setup, which every other trial would meet too.

Tune retries a failed trial and runs the rest of the stage; for a GPU node without CUDA (`NoCudaError`) that only
repeats the refusal on every trial and leaves a search that "finished" with nothing trained. `FatalTrialErrors` is
both a Tune callback (it reads each failed trial's error) and a stopper (it then stops the stage at once);
`raise_if_any` re-raises the first one in the driver, where the command reports it and exits non-zero.
"""

from __future__ import annotations

from ray import tune

from protopo_ray.cluster.sessions import NoCudaError

#: Errors a retry or another trial cannot fix (found by their class names in Tune's error text).
FATAL = (NoCudaError,)


def fatal_error(text: str) -> tuple[type[Exception], str] | None:
    """The fatal error class and its message if a trial's error text (traceback) holds one."""
    for error in FATAL:
        marker = f"{error.__name__}: "
        lines = [line for line in text.splitlines() if marker in line]
        if lines:  # the innermost raise: the last line that carries the class name
            return error, lines[-1].split(marker, 1)[1].strip()
    return None


class FatalTrialErrors(tune.Callback, tune.Stopper):
    """Watch the stage's trial failures; once one is fatal, stop every trial and keep its message."""

    def __init__(self) -> None:
        self.found: tuple[type[Exception], str] | None = None

    def _check(self, trial_id: str, text: str) -> None:
        found = None if self.found else fatal_error(text)
        if found:
            self.found = found[0], f"trial {trial_id}: {found[1]}"

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._check(trial.trial_id, str(trial.get_error() or ""))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._check(trial.trial_id, str(trial.get_error() or ""))

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.found is not None

    def raise_if_any(self, results=()) -> None:
        """Raise the first fatal error seen during the stage, or held by one of its `results` (a restored stage
        runs with the stopper it was first started with, not this one)."""
        for result in results:
            if result.error is not None:
                self._check(getattr(result, "path", "?").rstrip("/").rsplit("/", 1)[-1], str(result.error))
        if self.found is not None:
            raise self.found[0](self.found[1])
