"""AWS batch calls sent again with what each answer leaves unprocessed.

DynamoDB's BatchGetItem and BatchWriteItem, and EventBridge's PutEvents, answer a throttled
request with the part they did not do; botocore retries whole requests only. The processor's
store and the read API both send such leftovers again here, with back-off, and give up with
`StoreError`. No pyarrow, no processor code: the read API imports it at cold start.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")


class StoreError(RuntimeError):
    """A write that still failed after its retries; the batch must be retried as a whole."""


def retry(call: Callable[[], _T], what: str, attempts: int = 8) -> _T:
    """Retry `call` with capped exponential back-off and full jitter. botocore already
    retries throttling per request; this covers the unprocessed items of batch calls."""
    delay = 0.05
    for attempt in range(attempts):
        result = call()
        if result is not None:
            return result
        if attempt < attempts - 1:
            time.sleep(random.uniform(0, delay))  # back-off between retries, not synchronisation
            delay = min(delay * 2, 2.0)
    raise StoreError(f"{what}: still unprocessed after {attempts} attempts")


def until_processed(dynamodb: Any, operation: str, table: str, request: Any) -> list[dict[str, Any]]:
    """One BatchGetItem or BatchWriteItem request for `table`, sent again with what each answer
    leaves unprocessed until nothing is (`retry`: back-off, then `StoreError`); the items it read."""
    send = getattr(dynamodb, operation)
    items: list[dict[str, Any]] = []
    pending: dict[str, Any] = {table: request}

    def call() -> bool | None:
        resp = send(RequestItems=pending)
        items.extend(resp.get("Responses", {}).get(table, []))
        left = resp.get("UnprocessedKeys") or resp.get("UnprocessedItems") or {}
        if not left:
            return True
        pending.clear()
        pending.update(left)
        return None

    retry(call, f"{dynamodb.meta.method_to_api_mapping[operation]} {table}")
    return items
