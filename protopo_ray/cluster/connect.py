"""Connecting to Ray: join the cluster this process belongs to, or start a local one bound to 127.0.0.1; what a run
requires of the cluster it joined (storage every node sees) and the placement groups it must not leave behind."""

from __future__ import annotations

import os
import sys
from typing import Any

import ray
from ray._private import services
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from protopo_ray.data import storage

_started_local_cluster = False


def started_local_cluster() -> bool:
    """Whether this process started its own local cluster (so it may shut it down when done)."""
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


RESERVED_STATES = ("CREATED", "PENDING", "RESCHEDULING", "PREPARED")
"""Placement-group states that hold (or wait for) resources; REMOVED is the only other one."""


class SharedStorageError(ValueError):
    """Local storage on a cluster whose trials may run on other nodes: checkpoints would be scattered."""


def cluster_node_count() -> int:
    """Nodes of the connected cluster alive now (`ray.nodes()`)."""
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def require_shared_storage(storage_path: str, *, shared: bool, num_nodes: int, what: str = "this run") -> None:
    """Refuse a local storage path for `what` on a cluster of `num_nodes` > 1 unless declared shared.

    Ray Train writes each checkpoint on the node that ran the trial: on a local path promotion, `--resume` and
    the report cannot find them from the head. Object storage (s3://, gs://) and a mount every node has at
    the same path (declared with `resources.shared_storage = true` / `--shared-storage`) work.
    """
    if num_nodes <= 1 or shared or storage.is_uri(storage_path):
        return
    raise SharedStorageError(
        f"resources.storage = {storage_path!r} is a local directory, but {what} runs on a cluster of {num_nodes} "
        f"nodes (alive now or that its autoscaler may start): each node would keep the checkpoints of the trials "
        f"it ran, and promotion, --resume and the report would not find them. Use object storage every node "
        f"reaches (--storage s3://BUCKET/runs or gs://BUCKET/runs), or a shared mount every node has at the "
        f"same path (NFS, EFS, Filestore) and declare it with --shared-storage (resources.shared_storage = true)")


def reserved_placement_groups(job_id: str | None = None) -> list[str]:
    """Hex ids of the placement groups that hold or wait for resources: every job's, or only those created by
    job `job_id` (hex; Ray embeds the creating job's id in the last bytes of a placement group's id, also for
    groups that the job's actors create, as Ray Train's controller does for its worker group)."""
    table = placement_group_table()
    return [pg_id for pg_id, info in table.items() if info.get("state") in RESERVED_STATES
            and (job_id is None or pg_id.endswith(job_id))]


def release_leaked_placement_groups() -> int:
    """After a stage: remove the placement groups this driver's job still holds; how many were removed.

    Ray Train V2 placement groups can outlive a Tune trial that ASHA stopped or that failed
    (ray-project/ray#54305): they keep their GPUs reserved, the next stage's worker groups wait for them and
    idle GPU nodes never scale down. Between stages no trial of this search runs, so every group its job (this
    driver, its Tune trials and their Train controllers) still holds is a leak. Groups of other jobs on a shared
    cluster are never touched.
    """
    job_id = ray.get_runtime_context().get_job_id()
    leaked = reserved_placement_groups(job_id)
    for pg_id in leaked:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
    return len(leaked)
