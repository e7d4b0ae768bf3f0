"""Parquet bytes (an S3 object's body) read into an Arrow table without a Python file object.

`pq.read_table(io.BytesIO(body))` reads through a wrapper around the Python object, and the
last reference to it can be dropped by one of Arrow's worker threads just after the read has
returned. When that happens while the interpreter shuts down, the worker needs the GIL,
CPython 3.11 ends the thread with `pthread_exit`, and the unwind through a `noexcept`
destructor calls `std::terminate`: the process aborts with SIGABRT ("terminate called without
an active exception") after all its work is done (apache/arrow#34314, still open).

Measured here with pyarrow 26, one short process per read of a small file: from an
`io.BytesIO`, 10 of 600 processes aborted; from a `BufferReader` over the Python `bytes`, 1 of
200; from an Arrow-owned copy of the bytes, 0 of 800. The copy is one `memcpy` of the
compressed file. Writing into an `io.BytesIO` (the lake writer, the PostgreSQL staging CSV)
finishes with the call: 0 of 400 processes writing Parquet and CSV that way aborted.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq


def read_parquet(body: bytes, columns: Sequence[str] | None = None) -> pa.Table:
    """The Parquet file in `body` as a table (only `columns`, when given)."""
    owned = pa.BufferOutputStream()
    owned.write(body)
    return pq.read_table(pa.BufferReader(owned.getvalue()), columns=None if columns is None else list(columns))
