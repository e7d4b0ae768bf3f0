"""The operators' read API (issue 6): JSON over HTTP on the live store.

Place in the flow: at the end of the streaming path. The processor writes zone state and
zone-minute metrics to DynamoDB and alerts to EventBridge; this package reads them back for
the live dashboard. In AWS it is one Lambda behind API Gateway (`handler.lambda_handler`)
plus a small EventBridge target (`alerts.store_alert_handler`) that keeps the alert log;
locally `infra/local/dashboard_server.py` serves the same handler on 127.0.0.1.

It lives under `streaming/` because it is deployed like the processor: the same code zip,
the same contract (`streaming.contract.is_plain_id`) and state format (`ZoneState`).
"""
