"""Put the W&B API key from a cloud secret store into ~/.netrc (mode 0600) on the node this runs on.

Run by the cluster YAMLs' head_setup_commands, inside the container, so the key never passes through Ray:
not through runtime_env (stored in the GCS, shown on the dashboard), not through the YAML or the job command.
W&B and protopo_ray.search.tracking find the key in ~/.netrc and log online; without it the search logs
offline (`wandb sync` later).

    python deploy/wandb_netrc.py --aws-secret protopo-ray/wandb-api-key --region us-west-2
    python deploy/wandb_netrc.py --gcp-secret protopo-ray-wandb-api-key     # in the VM's own project

A secret that does not exist is not an error (W&B stays offline); any other failure (no permission, no
network) is, so a half-configured secret fails `ray up` loudly instead of silently logging offline.
"""

from __future__ import annotations

import argparse
import base64
import netrc
import os
import sys
from pathlib import Path

WANDB_HOST = "api.wandb.ai"


class SecretNotFound(Exception):
    pass


def read_aws_secret(name: str, region: str | None) -> str:
    import boto3

    client = boto3.client("secretsmanager", region_name=region)
    try:
        return client.get_secret_value(SecretId=name)["SecretString"].strip()
    except client.exceptions.ResourceNotFoundException as e:
        raise SecretNotFound(f"AWS Secrets Manager has no secret {name!r}") from e


def read_gcp_secret(name: str) -> str:
    import google.auth
    from google.auth.transport.requests import AuthorizedSession

    credentials, project = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    if not name.startswith("projects/"):
        name = f"projects/{project}/secrets/{name}"
    version = name if "/versions/" in name else f"{name}/versions/latest"
    response = AuthorizedSession(credentials).get(f"https://secretmanager.googleapis.com/v1/{version}:access")
    if response.status_code == 404:
        raise SecretNotFound(f"GCP Secret Manager has no secret {name!r}")
    response.raise_for_status()
    return base64.b64decode(response.json()["payload"]["data"]).decode().strip()


def write_netrc(key: str, path: Path) -> None:
    """Set the api.wandb.ai entry, keep every other machine's; the file is created 0600 and stays so."""
    hosts = netrc.netrc(str(path)).hosts if path.exists() else {}
    hosts[WANDB_HOST] = ("user", None, key)
    lines = []
    for host, (login, account, password) in hosts.items():
        lines.append(f"machine {host}\n  login {login}\n" + (f"  account {account}\n" if account else "")
                     + f"  password {password}\n")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--aws-secret", help="AWS Secrets Manager secret name (SecretString: the bare key)")
    source.add_argument("--gcp-secret", help="NAME in the VM's project, or projects/P/secrets/NAME[/versions/V] (payload: the bare key)")
    parser.add_argument("--region", help="AWS region of the secret (default: the node's)")
    parser.add_argument("--netrc", type=Path, default=Path.home() / ".netrc")
    args = parser.parse_args(argv)
    try:
        key = read_aws_secret(args.aws_secret, args.region) if args.aws_secret else read_gcp_secret(args.gcp_secret)
    except SecretNotFound as e:
        print(f"wandb_netrc: {e}; W&B logs offline on this cluster (`wandb sync` later)", file=sys.stderr)
        return 0
    if not key:
        print("wandb_netrc: the secret is empty; nothing written", file=sys.stderr)
        return 1
    write_netrc(key, args.netrc)
    print(f"wandb_netrc: W&B key written to {args.netrc} (mode 600)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
