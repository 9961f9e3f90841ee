"""Connecting to Ray: join the cluster this process belongs to, or start a local one bound to 127.0.0.1."""

from __future__ import annotations

import os
import sys
from typing import Any

import ray
from ray._private import services
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

_started_local_cluster = False


def started_local_cluster() -> bool:
    """Whether this process started its own local cluster (so it may clean up after Ray's leaks there)."""
    return _started_local_cluster


def running_cluster() -> str | None:
    """Address of a Ray cluster running on this machine (started by `ray start`), if its GCS is alive.

    `ray.init(address="auto")` trusts the address file of the last `ray start`; after that cluster died it
    retries a dead GCS for minutes. Only addresses of live GCS processes count here.
    """
    live = services.find_gcs_addresses()
    recorded = services.find_bootstrap_address(None)
    if recorded and recorded in live:
        return recorded
    return next(iter(live)) if len(live) == 1 else None


def ray_init(*, log_to_driver: bool | None = None, logging_level: int | str | None = None, **kwargs: Any):
    """Join the running cluster (RAY_ADDRESS, or a live local `ray start`), else start one bound to 127.0.0.1.

    Returns Ray's context (None when this process was already connected). `log_to_driver` (forward the
    workers' output to this process) and `logging_level` (of the driver's "ray" logger) apply either way,
    Ray's defaults when None; `kwargs` go to a new local cluster.
    """
    if ray.is_initialized():
        return None
    driver = {k: v for k, v in (("log_to_driver", log_to_driver), ("logging_level", logging_level)) if v is not None}
    address = os.environ.get("RAY_ADDRESS") or running_cluster()
    if address and address != "local":  # RAY_ADDRESS=local: always a new local cluster (tests, benchmarks)
        context = ray.init(address=address, **driver)
    else:
        # Ray starts workers at nice 15 by default; on a machine shared with other jobs that starves the
        # training workers (measured: 0.54x of an in-process run) and Ray's own placement-group cleanup
        # (stalled searches). A local cluster's processes inherit this environment.
        os.environ.setdefault("RAY_worker_niceness", "0")
        # A local cluster keeps its dashboard on the loopback interface only.
        os.environ.pop("RAY_ADDRESS", None)
        # address="local": a new cluster even where an address file of another one lingers.
        context = ray.init(address="local", dashboard_host="127.0.0.1", include_dashboard=True, **driver, **kwargs)
        global _started_local_cluster
        _started_local_cluster = True
    url = context.dashboard_url
    print(f"Ray dashboard: {'http://' + url if url else 'not running'}", file=sys.stderr, flush=True)
    return context


def release_leaked_placement_groups() -> None:
    """After a stage, on a local cluster this process started: remove the Train placement groups left behind.

    Ray Train V2 placement groups can outlive a Tune trial that ASHA stopped (ray-project/ray#54305); the next
    stage's worker groups then wait forever for their CPUs. Between stages no trial of ours runs, and on a
    cluster we started nobody else's do, so every remaining placement group is a leak.
    """
    if not started_local_cluster():
        return
    for pg_id, info in placement_group_table().items():
        if info.get("state") in ("CREATED", "PENDING", "RESCHEDULING"):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
