"""Connecting to Ray: join the cluster this process belongs to (whatever its authentication mode), or start a local
one bound to 127.0.0.1; what a run requires of the cluster it joined (storage every node sees) and the placement
groups it must not leave behind."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import grpc
import ray
from ray._private import services
from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR, _enable_token_auth
from ray._raylet import AuthenticationTokenLoader
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
from ray.exceptions import AuthenticationError
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from protopo_ray.data import storage

_started_local_cluster = False


def started_local_cluster() -> bool:
    """Whether this process started its own local cluster (so it may shut it down when done)."""
    return _started_local_cluster


def running_cluster() -> str | None:
    """Address of a Ray cluster running on this machine (started by `ray start`), if its GCS is alive.

    `ray.init(address="auto")` trusts the address file of the last `ray start`; after that cluster died it
    retries a dead GCS for minutes. Only addresses of live GCS processes count here, and only the one `ray start`
    recorded: a live GCS nobody recorded is another process's private cluster (a second `tune` or `predict --ray`
    on the same machine started it with `ray.init`), which ends when that process exits, taking this one's trials
    with it.
    """
    recorded = services.find_bootstrap_address(None)
    return recorded if recorded and recorded in services.find_gcs_addresses() else None


class ClusterAuthError(ValueError):
    """A running cluster this process cannot join as configured: its token authentication refuses it."""


#: Ray Train keeps runs, attempts and workers for the dashboard (its Train page, /api/train/v2/runs) only with this
#: set in the process that calls `fit()`; cluster.train_run sets it there too (0 turns it off).
TRAIN_STATE_TRACKING_ENV = "RAY_TRAIN_ENABLE_STATE_TRACKING"
_HOST_PORT = re.compile(r"^[\w.\-\[\]:]+:\d+$")


def head_requires_token(address: str, timeout_s: float = 5.0, token: str | None = None) -> bool | None:
    """Whether the GCS at `address` (host:port) refuses a client that sends `token` (None: no token): True or
    False, None when nothing answers there. One small RPC: `ray.init` against a head that refuses it retries for
    ~20 s and ends in a bare ConnectionError."""
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(address) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                return True
            return None if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) else False
    return False


def _token_source() -> str:
    """Where Ray's token loader looks first, as a user would set it."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}"
    return str(Path.home() / ".ray" / "auth_token")


def prepare_auth(address: str, source: str) -> None:
    """Switch this process to token authentication when the head at `address` requires it, as `ray.init(address=
    "auto")` does for a local cluster (Ray never does for an explicit address: RAY_ADDRESS, or the address of a
    `ray start` found here); raise ClusterAuthError with what to set where it cannot join.

    The token is sent only to a head that has refused a client without one, and checked before `ray.init`.
    RAY_AUTH_MODE=token set by the user (or by the head, for a job it runs) is left to Ray.
    """
    mode = os.environ.get(AUTH_MODE_ENV_VAR)
    if (mode or "").lower() == "token" or not _HOST_PORT.match(address) or os.environ.get("RAY_USE_TLS") == "1":
        return
    if not head_requires_token(address):
        return  # no authentication, or nothing answers (ray.init says so in its own words)
    where = f"the Ray cluster at {address} ({source}) requires token authentication"
    if mode is not None:
        raise ClusterAuthError(f"{where}, but {AUTH_MODE_ENV_VAR}={mode}: set {AUTH_MODE_ENV_VAR}=token (or unset it)")
    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()
    try:
        has_token = loader.has_token(ignore_auth_mode=True)
    except AuthenticationError:  # RAY_AUTH_TOKEN_PATH names a file that is missing or empty
        has_token = False
    if not has_token:
        raise ClusterAuthError(f"{where} and this process has no token ({_token_source()} is missing or empty): set "
                               f"RAY_AUTH_TOKEN_PATH to the token file the head was started with (`ray get-auth-token` "
                               f"on the head prints it) and {AUTH_MODE_ENV_VAR}=token")
    if head_requires_token(address, token=loader.get_raw_token(ignore_auth_mode=True)):
        raise ClusterAuthError(f"{where} and refuses the token of {_token_source()}: set RAY_AUTH_TOKEN_PATH to the "
                               f"token file the head was started with (`ray get-auth-token` on the head prints it)")
    _enable_token_auth()  # RAY_AUTH_MODE=token for this process and what it starts, and Ray's config re-read


def ray_init(*, log_to_driver: bool | None = None, logging_level: int | str | None = None, job_name: str | None = None,
             **kwargs: Any):
    """Join the running cluster (RAY_ADDRESS, or a live local `ray start`), else start one bound to 127.0.0.1.

    Returns Ray's context (None when this process was already connected). `log_to_driver` (forward the
    workers' output to this process) and `logging_level` (of the driver's "ray" logger) apply either way,
    Ray's defaults when None; `job_name` is the driver job's Name on the dashboard's Jobs page (a job submitted
    with `ray job submit` keeps the name its submission gives, `--metadata-json '{"job_name": ...}'`); `kwargs`
    go to a new local cluster. Joining a head with token authentication needs its token (`prepare_auth`).
    """
    if ray.is_initialized():
        return None
    driver: dict[str, Any] = {k: v for k, v in (("log_to_driver", log_to_driver), ("logging_level", logging_level))
                              if v is not None}
    if job_name:
        driver["job_config"] = ray.job_config.JobConfig(metadata={"job_name": job_name})
    os.environ.setdefault(TRAIN_STATE_TRACKING_ENV, "1")  # a local cluster's processes inherit it
    explicit = os.environ.get("RAY_ADDRESS")
    address = explicit or running_cluster()
    if address and address != "local":  # RAY_ADDRESS=local: always a new local cluster (tests, benchmarks)
        prepare_auth(address, "RAY_ADDRESS" if explicit else "a `ray start` running on this machine")
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


def session_dir() -> str:
    """The connected cluster's session directory on this node (`<temp dir>/session_<time>`): Ray's logs, and the
    Prometheus and Grafana configurations its dashboard writes under metrics/."""
    return ray._private.worker._global_node.get_session_dir_path()


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
