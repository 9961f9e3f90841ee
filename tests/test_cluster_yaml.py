"""The cluster YAMLs are valid for the installed Ray's autoscaler and carry what the planner relies on."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess

import jsonschema
import pytest
import ray
import yaml

from protopo_ray.search.inventory import DRIVER_RESOURCE, GIB, GPU_MEMORY_RESOURCE, inventory_from_cluster_yaml
from protopo_ray.search.plan import plan_promotion, plan_search

REPO = pathlib.Path(__file__).resolve().parents[1]
YAMLS = [REPO / "cluster.yaml", REPO / "cluster-gcp.yaml"]
AWS, GCP = YAMLS
DEPLOY = REPO / "deploy"
DLAMI_NAME = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)"
DLAMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/"


def load(path: pathlib.Path) -> dict:
    return yaml.safe_load(path.read_text())


def dockerfile_instructions(path: pathlib.Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped: what `docker build`
    parses. Raises on a line that is no Dockerfile instruction."""
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "USER", "LABEL", "EXPOSE", "ENTRYPOINT", "CMD",
             "SHELL", "VOLUME", "HEALTHCHECK", "STOPSIGNAL", "ONBUILD"}
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if line.rstrip().endswith("\\"):
            continue
        keyword, _, args = pending.strip().partition(" ")
        assert keyword.upper() in known, f"Dockerfile: {keyword!r} is no Dockerfile instruction ({pending!r})"
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "Dockerfile ends in a continuation line"
    return instructions


def documented_image_tag() -> str:
    match = re.search(r"^# tag: (\S+)$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert match, "Dockerfile: no '# tag: NAME:TAG' line"
    return match.group(1)


def node_types(path: pathlib.Path) -> dict:
    return load(path)["available_node_types"]


def gpu_node_types(path: pathlib.Path) -> dict:
    return {name: t for name, t in node_types(path).items() if t["resources"].get("GPU", 0) > 0}


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads((pathlib.Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", [*YAMLS, REPO / "cluster-fake.yaml"], ids=lambda p: p.name)
def test_validates_against_ray_autoscaler_schema(path, schema):
    jsonschema.validate(load(path), schema)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_passes_rays_own_config_preparation_and_validation(path):
    # What `ray up` does before it calls the cloud: merge the provider's defaults, then validate (no network).
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    validate_config(prepare_config(load(path)))


def test_dockerfile_builds_on_rays_gpu_image_with_the_locked_torch():
    instructions = dockerfile_instructions(REPO / "Dockerfile")
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert froms == [f"rayproject/ray:{ray.__version__}-py311-gpu"]  # the Ray pyproject pins, Python 3.11, CUDA 12
    args = dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)
    locked = re.search(r"^torch==(\S+)$", (REPO / "requirements.lock").read_text(), re.MULTILINE).group(1)
    assert args["TORCH_VERSION"] == locked
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d", args["TORCH_INDEX_URL"])  # a CUDA 12 build
    assert f"torch{locked}-{args['TORCH_INDEX_URL'].rsplit('/', 1)[1]}" in documented_image_tag()
    runs = " ".join(a for k, a in instructions if k == "RUN")
    assert "-c requirements.lock" in runs  # every other package at the lock's version


def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies():
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip()[:1] not in ("", "#")]
    assert lines[0] == "*"  # an allowlist: .venv, data/, runs/, .git never reach the build context
    allowed = {ln[1:] for ln in lines if ln.startswith("!")}
    copied = set()
    for keyword, args in dockerfile_instructions(REPO / "Dockerfile"):
        if keyword == "COPY":
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            copied.update(sources)
    assert copied <= allowed, f"COPY sources the context leaves out: {copied - allowed}"
    assert all((REPO / source).exists() for source in copied)


def test_both_clusters_run_the_dockerfiles_image():
    images = {path.name: load(path)["docker"]["image"] for path in YAMLS}
    assert len(set(images.values())) == 1, images
    registry, _, name = next(iter(images.values())).partition("/")
    assert name == documented_image_tag()
    # The registry is the one thing to set; the checklist says where.
    assert registry == "YOUR_REGISTRY" and "YOUR_REGISTRY" in (REPO / "docs" / "cloud.md").read_text()


def test_every_aws_node_type_boots_the_named_cuda12_driver_ami():
    text = AWS.read_text()
    assert DLAMI_NAME in text and "aws ec2 describe-images" in text
    image_ids = {name: t["node_config"].get("ImageId") for name, t in node_types(AWS).items()}
    assert len(set(image_ids.values())) == 1, image_ids  # one image for all: replacements match the rest
    image_id = next(iter(image_ids.values()))
    # A pinned id, or EC2 resolving AWS's public parameter for that AMI at launch (never Ray's old default DLAMI).
    assert re.fullmatch(r"ami-[0-9a-f]{8,17}", image_id) or image_id.startswith("resolve:ssm:" + DLAMI_PARAMETER)


def test_aws_instance_profiles_are_the_roles_the_policy_documents_describe():
    types = node_types(AWS)
    head = types[load(AWS)["head_node_type"]]["node_config"]["IamInstanceProfile"]["Name"]
    workers = {t["node_config"]["IamInstanceProfile"]["Name"] for n, t in types.items() if t["resources"].get("GPU")}
    assert (head, workers) == ("protopo-ray-head", {"protopo-ray-worker"})
    script = (DEPLOY / "aws" / "create-roles.sh").read_text()
    assert "for kind in head worker" in script and "name=protopo-ray-$kind" in script
    head_policy = json.loads((DEPLOY / "aws" / "head-policy.json").read_text())
    passrole = [s for s in head_policy["Statement"] if "iam:PassRole" in s["Action"]]
    assert [s["Resource"] for s in passrole] == ["arn:aws:iam::ACCOUNT_ID:role/protopo-ray-worker"]
    assert all(s["Effect"] == "Allow" for s in head_policy["Statement"])
    actions = {a for s in head_policy["Statement"] for a in s["Action"]}
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "secretsmanager:GetSecretValue"} <= actions
    # The workers: the bucket and the image, no EC2 or IAM.
    worker_policy = json.loads((DEPLOY / "aws" / "worker-policy.json").read_text())
    worker_actions = {a for s in worker_policy["Statement"] for a in s["Action"]}
    assert all(a.split(":")[0] in ("s3", "ecr") for a in worker_actions), worker_actions
    s3_resources = {s["Resource"] for s in worker_policy["Statement"] if s["Action"][0].startswith("s3:")}
    assert s3_resources == {"arn:aws:s3:::BUCKET_NAME", "arn:aws:s3:::BUCKET_NAME/*"}
    trust = json.loads((DEPLOY / "aws" / "ec2-trust-policy.json").read_text())
    assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}


def test_gcp_gpu_nodes_install_the_driver_and_wait_for_nvidia_smi():
    for name, node_type in gpu_node_types(GCP).items():
        config = node_type["node_config"]
        items = {i["key"]: i["value"] for i in config["metadata"]["items"]}
        assert items.get("install-nvidia-driver") == "True", name
        assert config["scheduling"]["onHostMaintenance"] == "TERMINATE", name
        image = config["disks"][0]["initializeParams"]["sourceImage"]
        assert image.startswith("projects/deeplearning-platform-release/global/images/") and "cu12" in image, name
        # Node-type commands replace the global list: the wait and the registry login both have to be here.
        commands = " ".join(node_type["initialization_commands"])
        assert "until nvidia-smi" in commands and "timeout" in commands, name
        assert "gcloud auth configure-docker" in commands, name


def test_gcp_workers_carry_the_bucket_service_account():
    script = (DEPLOY / "gcp" / "create-service-accounts.sh").read_text()
    for name, node_type in gpu_node_types(GCP).items():
        [account] = node_type["node_config"]["serviceAccounts"]
        assert account["email"].startswith("protopo-ray-worker@"), name
        assert "https://www.googleapis.com/auth/devstorage.read_write" in account["scopes"], name
    assert "worker_sa=protopo-ray-worker@" in script and "roles/storage.objectAdmin" in script


@pytest.mark.parametrize("path", [*YAMLS, REPO / "cluster-fake.yaml", REPO / "Dockerfile"], ids=lambda p: p.name)
def test_no_wandb_key_travels_through_cluster_files(path):
    text = path.read_text()
    assert "WANDB_API_KEY" not in text and "runtime_env" not in text
    if path.suffix == ".yaml":
        spec = load(path)
        for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands"):
            assert not any("wandb login" in c or "WANDB" in c for c in spec.get(key, [])), key


def test_docs_never_pass_the_wandb_key_through_runtime_env():
    docs = (REPO / "docs" / "cloud.md").read_text()
    assert not re.search(r"env_vars[^`]*WANDB_API_KEY", docs, re.DOTALL)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_node_types_declare_what_the_planner_needs(path):
    spec = load(path)
    types = spec["available_node_types"]
    head = types[spec["head_node_type"]]["resources"]
    assert head.get(DRIVER_RESOURCE, 0) > 0 and head.get("CPU") == 0
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert len(gpu_types) >= 2  # a search pool and a promotion pool
    for name, node_type in gpu_types.items():
        resources = node_type["resources"]
        assert [k for k in resources if k.startswith("accelerator_type:")], f"{name}: no accelerator_type"
        assert resources.get(GPU_MEMORY_RESOURCE, 0) > 0, f"{name}: no {GPU_MEMORY_RESOURCE}"
        assert resources.get("CPU", 0) >= resources["GPU"], f"{name}: fewer CPUs than GPUs"
        assert any("--shm-size" in opt for opt in node_type["docker"]["worker_run_options"])


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_scaled_out_inventory_plans_both_stages(path):
    inventory = inventory_from_cluster_yaml(path)
    spec = load(path)
    workers = sum(t.get("max_workers", 0) for n, t in spec["available_node_types"].items()
                  if n != spec["head_node_type"])
    assert len(inventory.nodes) == 1 + workers <= 1 + spec["max_workers"]
    for node in inventory.nodes:
        if node.gpus:
            assert node.accelerator_type and node.gpu_memory_bytes
    search = plan_search(inventory, [int(0.3 * GIB)] * 36, num_trials=36)
    # 4 one-GPU search nodes with 8 vCPUs: 8 trials per GPU, 32 at once (one-worker trials need no driver
    # slot). Searches take the smaller GPU type; the 8-GPU node stays for promotion.
    assert search.accelerator_type in ("A10G", "L4")
    assert (search.trials_per_gpu, search.max_concurrent_trials) == (8, 32)
    promotion = plan_promotion(inventory, 2 * GIB, num_trials=2)
    assert (promotion.accelerator_type, promotion.num_workers, promotion.gpus_per_worker) == ("A100", 4, 1.0)
    # Priced by the default table: the search on the spot pool, the promotion on the on-demand node.
    assert (search.market, promotion.market) == ("spot", "on-demand")
    assert 0 < search.usd_per_device_hour < promotion.usd_per_device_hour
    assert {n.node_type for n in inventory.nodes} == set(spec["available_node_types"])


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_head_keeps_dashboard_on_loopback_and_requires_a_token(path):
    spec = load(path)
    head = " ".join(spec["head_start_ray_commands"])
    worker = " ".join(spec["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # reached through `ray dashboard cluster.yaml` (SSH forward)
    assert "RAY_AUTH_MODE=token ray start --head" in head and "RAY_AUTH_MODE=token ray start --address" in worker
    assert spec["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"


@pytest.mark.parametrize("script", ["aws/create-roles.sh", "gcp/create-service-accounts.sh"])
def test_deploy_scripts_parse(script):
    subprocess.run(["bash", "-n", str(DEPLOY / script)], check=True)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_head_runs_prometheus_and_grafana_on_rays_configuration(path):
    """The dashboard's Metrics view embeds Grafana only where the head's `ray start` names Prometheus and Grafana."""
    commands = load(path)["head_start_ray_commands"]
    start = next(c for c in commands if "ray start --head" in c)
    for variable in ("RAY_PROMETHEUS_HOST=http://127.0.0.1:9090", "RAY_GRAFANA_HOST=http://127.0.0.1:3000",
                     "RAY_GRAFANA_IFRAME_HOST="):
        assert variable in start
    after = commands[commands.index(start) + 1:]
    assert any("python -m protopo_ray.monitoring.head" in c and "--grafana-home /opt/grafana" in c for c in after)


def test_project_image_carries_prometheus_and_grafana():
    runs = " ".join(args for op, args in dockerfile_instructions(REPO / "Dockerfile") if op == "RUN")
    assert "/usr/local/bin/prometheus" in runs and "ln -s \"/opt/grafana-v${GRAFANA_VERSION}\" /opt/grafana" in runs
    assert "prometheus --version && /opt/grafana/bin/grafana --version" in runs
