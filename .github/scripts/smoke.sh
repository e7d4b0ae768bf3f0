#!/usr/bin/env bash
# Smoke test of a deployed environment (deploy.yml, after the change set): the stack is
# complete, the processor is active with its Kinesis mapping enabled, the stream is active,
# and a message published through IoT Core reaches the processor within three minutes.
# Needs: ENV_NAME, AWS_REGION and the deploy role's credentials.
set -euo pipefail
: "${ENV_NAME:?}" "${AWS_REGION:?}"
stack="citypulse-${ENV_NAME}"
function_name="citypulse-${ENV_NAME}-processor"
stream="citypulse-${ENV_NAME}-telemetry"

status=$(aws cloudformation describe-stacks --stack-name "$stack" --query 'Stacks[0].StackStatus' --output text)
[[ "$status" == *_COMPLETE && "$status" != *ROLLBACK* ]] || { echo "stack ${stack}: ${status}" >&2; exit 1; }

read -r state update < <(aws lambda get-function-configuration --function-name "$function_name" \
  --query '[State,LastUpdateStatus]' --output text)
[[ "$state" == Active && "$update" == Successful ]] || { echo "processor: ${state}/${update}" >&2; exit 1; }

mapping=$(aws lambda list-event-source-mappings --function-name "$function_name" \
  --query 'EventSourceMappings[0].State' --output text)
[[ "$mapping" == Enabled ]] || { echo "event-source mapping: ${mapping}" >&2; exit 1; }

stream_status=$(aws kinesis describe-stream-summary --stream-name "$stream" \
  --query StreamDescriptionSummary.StreamStatus --output text)
[[ "$stream_status" == ACTIVE ]] || { echo "stream: ${stream_status}" >&2; exit 1; }

# One empty gateway message on a smoke topic: the processor counts it (zone "smoke" is not
# in the registry, so nothing lands in the live tables) and logs the batch.
endpoint=$(aws iot describe-endpoint --endpoint-type iot:Data-ATS --query endpointAddress --output text)
since=$(( $(date +%s) * 1000 ))
sent_at=$(date -u +%Y-%m-%dT%H:%M:%S.000Z)
payload=$(printf '{"schema_version":1,"gateway_id":"gw-smoke","zone_id":"smoke","sent_at":"%s","readings":[]}' "$sent_at")
aws iot-data publish --endpoint-url "https://${endpoint}" --topic "citypulse/telemetry/smoke/gw-smoke" \
  --qos 1 --cli-binary-format raw-in-base64-out --payload "$payload"

for _ in $(seq 1 36); do
  found=$(aws logs filter-log-events --log-group-name "/aws/lambda/${function_name}" --start-time "$since" \
    --filter-pattern '"batch processed"' --max-items 1 --query 'length(events)' --output text 2>/dev/null || echo 0)
  if [[ "$found" != 0 && "$found" != None ]]; then
    echo "smoke test passed: the processor handled the smoke message"
    exit 0
  fi
  sleep 5
done
echo "smoke test failed: no processed batch in the processor's log within 3 minutes" >&2
exit 1
