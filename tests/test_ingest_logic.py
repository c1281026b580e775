"""Pure helpers of the ingest actor."""

from __future__ import annotations

import base64
import json

from common.messages import DeadLetter
from workers.ingest import DLQ_INLINE_LIMIT, without_inline_bytes


def test_a_large_inline_image_is_elided_from_its_dead_letter() -> None:
    data = base64.b64encode(b"\xff" * DLQ_INLINE_LIMIT).decode()
    raw = json.dumps({"schema": 1, "event_id": "e1", "image_id": "i", "data_b64": data}).encode()
    dead = DeadLetter.for_record("e1", "too_large", "too big", without_inline_bytes(raw))
    assert dead.original["data_b64_elided_bytes"] == len(data)
    assert "data_b64" not in dead.original and dead.original["event_id"] == "e1"


def test_small_or_non_json_records_are_kept_whole() -> None:
    small = json.dumps({"event_id": "e", "data_b64": "AAAA"}).encode()
    assert without_inline_bytes(small) == small
    garbage = b"\x00" * (DLQ_INLINE_LIMIT + 1)
    assert without_inline_bytes(garbage) == garbage
