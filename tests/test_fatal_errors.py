"""Trial errors that end a search: found in Tune's error text (a traceback), whatever wraps them."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from protopo_ray.cluster.sessions import NoCudaError  # noqa: E402
from protopo_ray.search.fatal_errors import FatalTrialErrors, fatal_error  # noqa: E402

TRACEBACK = """Failure # 1 (occurred at 2026-12-03_23:50:01)
ray::ImplicitFunc.train() (pid=4242, ip=127.0.0.1)
  File "protopo_ray/cluster/sessions.py", line 70, in __init__
    require_cuda(config, self.placement["gpu_ids"], torch.cuda.is_available(), node=runtime.get_node_id())
protopo_ray.cluster.sessions.NoCudaError: Ray gave search_1 GPU(s) 0 on node ab12, but torch sees no CUDA device
"""


def test_a_no_cuda_refusal_is_fatal_with_its_message():
    assert fatal_error(TRACEBACK) == (NoCudaError, "Ray gave search_1 GPU(s) 0 on node ab12, but torch sees no CUDA device")
    assert fatal_error("Failure # 1\nValueError: loss is nan\n") is None  # a retry or another trial may fare better


class Trial:
    trial_id = "t1"

    def __init__(self, text: str) -> None:
        self.text = text

    def get_error(self) -> str:
        return self.text


def test_first_fatal_failure_stops_the_stage_and_is_raised():
    fatal = FatalTrialErrors()
    fatal.on_trial_recover(1, [], Trial("Failure # 1\nRuntimeError: worker died\n"))
    assert not fatal.stop_all()
    fatal.on_trial_recover(2, [], Trial(TRACEBACK))
    assert fatal.stop_all() and not fatal("t2", {"epoch": 1})  # no trial is stopped for its results
    with pytest.raises(NoCudaError, match="trial t1: Ray gave search_1"):
        fatal.raise_if_any()
