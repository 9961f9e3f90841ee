#!/usr/bin/env bash
# Creates the two IAM roles and instance profiles cluster.yaml names, once per AWS account (safe to rerun: it
# skips what exists and rewrites the inline policies). Run with credentials that may manage IAM:
#
#   deploy/aws/create-roles.sh BUCKET_NAME [AWS_REGION]        # e.g. protopo-ray-data us-west-2
#
#   protopo-ray-head    the head: launches and terminates this cluster's workers (EC2), passes them the worker
#                       role (iam:PassRole), resolves the DLAMI parameter, reads/writes the bucket, pulls the
#                       image from ECR, reads the W&B key secret (head-policy.json)
#   protopo-ray-worker  the GPU workers: the bucket and the image, nothing else (worker-policy.json)
#
# ACCOUNT_ID, AWS_REGION and BUCKET_NAME in the JSON files are filled in here; the files stay generic.
set -euo pipefail
BUCKET_NAME=${1:?usage: $0 BUCKET_NAME [AWS_REGION]}
AWS_REGION=${2:-us-west-2}
ACCOUNT_ID=$(aws sts get-caller-identity --query Account --output text)
here=$(cd "$(dirname "$0")" && pwd)

render() {
  sed -e "s/ACCOUNT_ID/$ACCOUNT_ID/g" -e "s/AWS_REGION/$AWS_REGION/g" -e "s/BUCKET_NAME/$BUCKET_NAME/g" "$here/$1"
}

for kind in head worker; do
  name=protopo-ray-$kind
  if ! aws iam get-role --role-name "$name" >/dev/null 2>&1; then
    aws iam create-role --role-name "$name" --assume-role-policy-document "file://$here/ec2-trust-policy.json" \
      --description "protopo_ray Ray cluster $kind node" >/dev/null
  fi
  aws iam put-role-policy --role-name "$name" --policy-name "$name" --policy-document "$(render "$kind-policy.json")"
  if ! aws iam get-instance-profile --instance-profile-name "$name" >/dev/null 2>&1; then
    aws iam create-instance-profile --instance-profile-name "$name" >/dev/null
    aws iam add-role-to-instance-profile --instance-profile-name "$name" --role-name "$name"
  fi
  echo "role and instance profile $name: ready"
done

# Spot launches need EC2's service-linked role; an account that never ran a spot instance lacks it, and the head's
# role may not create it. "has been taken" means it exists already.
aws iam create-service-linked-role --aws-service-name spot.amazonaws.com >/dev/null 2>&1 || true
echo "IAM propagation takes ~15 s; then: ray up cluster.yaml"
