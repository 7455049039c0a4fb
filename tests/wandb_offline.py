"""Read the metrics an offline wandb run wrote, from its ``run-*.wandb`` log file.

The file is W&B's LevelDB-style record log (a 7-byte file header, 32 KiB blocks of
records with a 7-byte header each) holding protobuf ``Record`` messages.
"""

import json
import struct
import time
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> list[bytes]:
    payloads, pending, pos = [], b"", HEADER  # skip the file header
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind not in (FULL, FIRST, MIDDLE, LAST):  # zero padding up to the block's end
            pos += left_in_block
            continue
        if pos + HEADER + length > len(data):  # a record still being written
            break
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            payloads.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        else:
            payloads.append(pending + chunk)
    return payloads


def _records(run_file: Path) -> list[wandb_internal_pb2.Record]:
    records = []
    for payload in _payloads(run_file.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def history_rows(run_file: Path, timeout_s: float = 120.0) -> list[dict[str, Any]]:
    """Rows of the run's history, once the log holds its ``exit`` record.

    wandb's service process writes the log after ``wandb.finish()`` returns, so on a busy
    machine the tail may not be on disk yet: wait for the record that ends the run.
    """
    deadline = time.monotonic() + timeout_s
    records = _records(run_file)
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{run_file} has no exit record after {timeout_s} s")
        time.sleep(0.5)
        records = _records(run_file)
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item})
    return rows
