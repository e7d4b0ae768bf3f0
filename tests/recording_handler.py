"""A handler for poller tests run in a subprocess: appends each record's data, one per line,
to the file named by RECORDING_HANDLER_OUT, flushed to disk before the batch is reported done."""

from __future__ import annotations

import base64
import os
from typing import Any


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    with open(os.environ["RECORDING_HANDLER_OUT"], "ab") as f:
        f.write(b"".join(base64.b64decode(r["kinesis"]["data"]) + b"\n" for r in event["Records"]))
        f.flush()
        os.fsync(f.fileno())
    return {"batchItemFailures": []}
