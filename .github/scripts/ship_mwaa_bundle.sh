#!/usr/bin/env bash
# Upload the MWAA bundle (make mwaa-bundle: dags/, requirements.txt, startup.sh) to the
# environment's Airflow bucket and print the stack parameters that pin MWAA to the uploaded
# object versions, e.g. "MwaaRequirementsObjectVersion=abc MwaaStartupScriptObjectVersion=def".
# Exits 3 (printing nothing) when the bucket does not exist yet: the first deploy creates it.
# Needs: ENV_NAME and AWS credentials; dist/mwaa-bundle.zip built.
set -euo pipefail
: "${ENV_NAME:?}"
cd "$(dirname "$0")/../.."
account=$(aws sts get-caller-identity --query Account --output text)
bucket="citypulse-${ENV_NAME}-airflow-${account}"
if ! aws s3api head-bucket --bucket "$bucket" >/dev/null 2>&1; then
  exit 3
fi
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
python3 -m zipfile -e dist/mwaa-bundle.zip "$staging"
aws s3 sync --only-show-errors --delete "$staging/dags/" "s3://${bucket}/dags/" >&2
aws s3 cp --only-show-errors "$staging/requirements.txt" "s3://${bucket}/requirements.txt" >&2
aws s3 cp --only-show-errors "$staging/startup.sh" "s3://${bucket}/startup.sh" >&2
requirements=$(aws s3api head-object --bucket "$bucket" --key requirements.txt --query VersionId --output text)
startup=$(aws s3api head-object --bucket "$bucket" --key startup.sh --query VersionId --output text)
echo "MwaaRequirementsObjectVersion=${requirements} MwaaStartupScriptObjectVersion=${startup}"
