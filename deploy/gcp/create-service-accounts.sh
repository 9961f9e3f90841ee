#!/usr/bin/env bash
# Service accounts and bindings cluster-gcp.yaml relies on, once per GCP project (safe to rerun). Run with an
# account that may manage IAM in the project:
#
#   deploy/gcp/create-service-accounts.sh PROJECT_ID BUCKET_NAME [REGION]     # e.g. my-proj protopo-ray-data us-central1
#
#   ray-autoscaler-sa-v1  the head's account. `ray up` creates it if missing and grants it project roles (compute,
#                         storage, serviceAccountUser); it is made here first so that it can also pull the project
#                         image and read the W&B key secret before the first `ray up`.
#   protopo-ray-worker    the GPU workers' account (serviceAccounts in cluster-gcp.yaml; Ray gives its own account
#                         to the head only): the bucket and the image, nothing else.
set -euo pipefail
PROJECT_ID=${1:?usage: $0 PROJECT_ID BUCKET_NAME [REGION]}
BUCKET_NAME=${2:?usage: $0 PROJECT_ID BUCKET_NAME [REGION]}
REGION=${3:-us-central1}
head_sa=ray-autoscaler-sa-v1@$PROJECT_ID.iam.gserviceaccount.com
worker_sa=protopo-ray-worker@$PROJECT_ID.iam.gserviceaccount.com
gc() { gcloud --project "$PROJECT_ID" --quiet "$@" >/dev/null; }

gcloud iam service-accounts describe "$head_sa" --project "$PROJECT_ID" >/dev/null 2>&1 \
  || gc iam service-accounts create ray-autoscaler-sa-v1 --display-name "Ray Autoscaler Service Account (v1)"
gcloud iam service-accounts describe "$worker_sa" --project "$PROJECT_ID" >/dev/null 2>&1 \
  || gc iam service-accounts create protopo-ray-worker --display-name "protopo_ray GPU workers"

# Workers: read/write objects in the data/runs bucket only.
gc storage buckets add-iam-policy-binding "gs://$BUCKET_NAME" \
  --member "serviceAccount:$worker_sa" --role roles/storage.objectAdmin
# Both: pull the project image from the Artifact Registry repository `protopo-ray`.
for sa in "$head_sa" "$worker_sa"; do
  gc artifacts repositories add-iam-policy-binding protopo-ray --location "$REGION" \
    --member "serviceAccount:$sa" --role roles/artifactregistry.reader
done
# The head attaches the worker account to the VMs it creates.
gc iam service-accounts add-iam-policy-binding "$worker_sa" \
  --member "serviceAccount:$head_sa" --role roles/iam.serviceAccountUser
# The head reads the W&B key, if you stored one (docs/cloud.md, "W&B").
if gcloud secrets describe protopo-ray-wandb-api-key --project "$PROJECT_ID" >/dev/null 2>&1; then
  gc secrets add-iam-policy-binding protopo-ray-wandb-api-key \
    --member "serviceAccount:$head_sa" --role roles/secretmanager.secretAccessor
fi
echo "service accounts ready: $head_sa (head), $worker_sa (workers)"
