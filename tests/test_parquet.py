"""`streaming.parquet.read_parquet`: an S3 object's Parquet body as a table, read from an
Arrow-owned copy so that no Arrow worker thread is left holding a Python object when the
interpreter exits (apache/arrow#34314, see the module)."""

from __future__ import annotations

import io
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streaming.parquet import read_parquet

TABLE = pa.table({"sensor_id": ["s-1", "s-2", None] * 400, "count": list(range(1200))})


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_read_parquet_returns_the_table_or_the_columns_asked_for(compression: str) -> None:
    buf = io.BytesIO()
    pq.write_table(TABLE, buf, compression=compression)
    body = buf.getvalue()
    assert read_parquet(body).equals(TABLE)
    assert read_parquet(body, columns=("count",)).equals(TABLE.select(["count"]))


def test_read_parquet_keeps_no_reference_to_the_callers_bytes() -> None:
    """Neither the table nor a worker still finishing the read holds `body` once the call has
    returned, checked after each of 50 reads of an uncompressed file (which a reader over
    `body` itself could slice zero-copy). A reader over an `io.BytesIO` fails this: it leaves
    a reference after some reads of every run."""
    buf = io.BytesIO()
    pq.write_table(TABLE, buf, compression="none")
    body = buf.getvalue()
    before = sys.getrefcount(body)
    held = []
    for _ in range(50):
        table = read_parquet(body)
        held.append(sys.getrefcount(body) - before)
        assert table.equals(TABLE)
    assert held == [0] * 50
