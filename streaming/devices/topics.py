"""MQTT topics of the telemetry flow, shared by devices, the IoT policy's local twin (the
broker ACL) and the local rule bridge — one definition, no awscrt import.

A gateway publishes a zone's readings on `citypulse/telemetry/{zone_id}/{gateway_id}`, or on
the Basic Ingest form `$aws/rules/<rule>/citypulse/telemetry/...`, which IoT Core routes
straight to the rule without a messaging charge.
"""

from __future__ import annotations

import re

TOPIC_TEMPLATE = "citypulse/telemetry/{zone_id}/{gateway_id}"
BASIC_INGEST_PREFIX = "$aws/rules/{rule}/"
_RULE_NAME_RE = re.compile(r"[a-zA-Z0-9_]{1,128}")


def telemetry_topic(zone_id: str, gateway_id: str) -> str:
    """The topic a gateway publishes a zone's readings on (the broker/IoT policy enforces the last level)."""
    for part in (zone_id, gateway_id):
        if not part or any(c in part for c in "/+#"):
            raise ValueError(f"invalid topic level {part!r}")
    return TOPIC_TEMPLATE.format(zone_id=zone_id, gateway_id=gateway_id)


def basic_ingest_prefix(rule_name: str) -> str:
    """``$aws/rules/<rule name>/``: the prefix that routes a message straight to one IoT rule
    (Basic Ingest). The one definition; the local broker's ACL and rule bridge use it too."""
    if not _RULE_NAME_RE.fullmatch(rule_name):
        raise ValueError(f"invalid IoT rule name {rule_name!r} (letters, digits and _ only)")
    return BASIC_INGEST_PREFIX.format(rule=rule_name)


def basic_ingest_topic(rule_name: str, zone_id: str, gateway_id: str) -> str:
    """The Basic Ingest topic that delivers the telemetry topic's messages to rule ``rule_name`` directly."""
    return basic_ingest_prefix(rule_name) + telemetry_topic(zone_id, gateway_id)
