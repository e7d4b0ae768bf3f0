#!/usr/bin/env bash
# Deploy one environment's stack through a CloudFormation change set (deploy.yml, or by hand
# with the engineer role). Needs: ENV_NAME, ENVIRONMENT_TYPE, AWS_REGION and AWS credentials;
# optional: STACK_PARAMETERS ("Key=Value Key=Value", e.g. AlertEmail=ops@example.com).
# Uploads the processor package (dist/processor.zip) and the template to the artifacts
# bucket of infra/cloudformation/github-oidc.yaml, then creates, shows and executes the
# change set with the citypulse-cloudformation-exec role. Prints the stack's outputs.
set -euo pipefail
: "${ENV_NAME:?}" "${ENVIRONMENT_TYPE:?}" "${AWS_REGION:?}"
cd "$(dirname "$0")/../.."

account=$(aws sts get-caller-identity --query Account --output text)
bucket="citypulse-artifacts-${account}-${AWS_REGION}"
stack="citypulse-${ENV_NAME}"
template=infra/cloudformation/iot-analytics-system.yaml

code_key="processor/$(sha256sum dist/processor.zip | cut -c1-20).zip"
template_key="templates/$(sha256sum "$template" | cut -c1-20).yaml"
aws s3 cp --only-show-errors dist/processor.zip "s3://${bucket}/${code_key}"
aws s3 cp --only-show-errors "$template" "s3://${bucket}/${template_key}"
template_url="https://${bucket}.s3.${AWS_REGION}.amazonaws.com/${template_key}"
# Over CloudFormation's 51,200-byte inline limit: validated and deployed from S3.
aws cloudformation validate-template --template-url "$template_url" >/dev/null

params=(
  "ParameterKey=EnvName,ParameterValue=${ENV_NAME}"
  "ParameterKey=EnvironmentType,ParameterValue=${ENVIRONMENT_TYPE}"
  "ParameterKey=ProcessorCodeBucket,ParameterValue=${bucket}"
  "ParameterKey=ProcessorCodeKey,ParameterValue=${code_key}"
)
for pair in ${STACK_PARAMETERS:-}; do
  params+=("ParameterKey=${pair%%=*},ParameterValue=${pair#*=}")
done

if aws cloudformation describe-stacks --stack-name "$stack" >/dev/null 2>&1; then
  kind=UPDATE
else
  kind=CREATE
fi
change_set="deploy-${GITHUB_RUN_ID:-manual}-${GITHUB_RUN_ATTEMPT:-$(date +%s)}"
aws cloudformation create-change-set \
  --stack-name "$stack" --change-set-name "$change_set" --change-set-type "$kind" \
  --template-url "$template_url" \
  --parameters "${params[@]}" \
  --capabilities CAPABILITY_NAMED_IAM \
  --role-arn "arn:aws:iam::${account}:role/citypulse-cloudformation-exec" \
  --tags "Key=citypulse:env,Value=${ENV_NAME}" >/dev/null

if ! aws cloudformation wait change-set-create-complete --stack-name "$stack" --change-set-name "$change_set"; then
  reason=$(aws cloudformation describe-change-set --stack-name "$stack" --change-set-name "$change_set" \
    --query StatusReason --output text)
  if [[ "$reason" == *"didn't contain changes"* || "$reason" == *"No updates"* ]]; then
    echo "stack ${stack}: no changes"
    aws cloudformation delete-change-set --stack-name "$stack" --change-set-name "$change_set"
    exit 0
  fi
  echo "change set failed: ${reason}" >&2
  exit 1
fi

aws cloudformation describe-change-set --stack-name "$stack" --change-set-name "$change_set" \
  --query 'Changes[].ResourceChange.[Action,LogicalResourceId,ResourceType,Replacement]' --output table
aws cloudformation execute-change-set --stack-name "$stack" --change-set-name "$change_set"
if [[ "$kind" == CREATE ]]; then
  aws cloudformation wait stack-create-complete --stack-name "$stack"
else
  aws cloudformation wait stack-update-complete --stack-name "$stack"
fi
aws cloudformation describe-stacks --stack-name "$stack" --query 'Stacks[0].Outputs' --output table
