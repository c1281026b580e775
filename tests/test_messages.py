"""The wire contract of the four messages: what parses, what is rejected and how, and
that the checked-in JSON Schemas say the same thing as the models."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from common.errors import ModstreamError
from common.messages import (
    LABEL_IDS,
    LABELS,
    MAX_DEAD_LETTER_ID_LENGTH,
    MAX_DETAIL_LENGTH,
    MAX_ID_LENGTH,
    MAX_ORIGINAL_BYTES,
    MAX_URI_LENGTH,
    MESSAGE_TYPES,
    DeadLetter,
    Hashes,
    MessageError,
    ReviewDecision,
    Signals,
    UploadEvent,
    Verdict,
    parse,
    parse_dead_letter,
    parse_review_decision,
    parse_upload_event,
    parse_verdict,
    peek_event_id,
    record_placeholder_id,
    redact_credentials,
    to_json_bytes,
    utc_timestamp,
)
from common.schemas import build_schema, load_schema, render_schema, stale_schema_files

TS = "2026-11-23T10:00:00Z"
MD5 = "0123456789abcdef0123456789abcdef"
PHASH = "fedcba9876543210"
PDQ = "f0e1d2c3b4a5968778695a4b3c2d1e0f" * 2


def upload_doc(**changes: Any) -> dict[str, Any]:
    doc = {
        "schema": 1,
        "event_id": "ev-1",
        "image_id": "img-1",
        "uri": "file:///data/a.jpg",
        "uploader_id": "user-9",
        "ts": TS,
        "metadata": {"album": "summer", "tags": ["beach", 2]},
    }
    return {**doc, **changes}


def verdict_doc(**changes: Any) -> dict[str, Any]:
    doc = {
        "schema": 1,
        "event_id": "ev-1",
        "image_id": "img-1",
        "action": "review",
        "label": "adult",
        "score": 0.73,
        "source": "near_duplicate",
        "matched_image_id": "img-0",
        "signals": {"knn": 0.81, "cnn": None, "pdq_distance": 3, "thresholds": None},
        "hashes": {"md5": MD5, "pdq": PDQ, "pdq_quality": 100, "phash": PHASH},
        "model_version": "bundle-2026-11-01",
        "latency_ms": 41.5,
        "ts": TS,
    }
    return {**doc, **changes}


def review_doc(**changes: Any) -> dict[str, Any]:
    doc = {
        "schema": 1,
        "image_id": "img-1",
        "label": "normal",
        "reviewer": "alice",
        "ts": TS,
        "md5": MD5,
        "phash": PHASH,
    }
    return {**doc, **changes}


def dead_letter_doc(**changes: Any) -> dict[str, Any]:
    doc = {
        "schema": 1,
        "event_id": "ev-1",
        "reason": "fetch_failed",
        "detail": "HTTP 404 for https://cdn/x.jpg",
        "original": upload_doc(),
        "original_encoding": "json",
        "original_size": 180,
        "original_sha256": "ab" * 32,
        "original_truncated": False,
        "ts": TS,
    }
    return {**doc, **changes}


GOOD_DOCS: dict[type, Callable[..., dict[str, Any]]] = {
    UploadEvent: upload_doc,
    Verdict: verdict_doc,
    ReviewDecision: review_doc,
    DeadLetter: dead_letter_doc,
}
PARSERS = {
    UploadEvent: parse_upload_event,
    Verdict: parse_verdict,
    ReviewDecision: parse_review_decision,
    DeadLetter: parse_dead_letter,
}
REQUIRED_ON_WIRE = {
    UploadEvent: ["schema", "ts", "event_id", "image_id"],
    Verdict: [
        "schema",
        "ts",
        "event_id",
        "image_id",
        "action",
        "label",
        "score",
        "source",
        "signals",
        "hashes",
        "model_version",
        "latency_ms",
    ],
    ReviewDecision: ["schema", "ts", "image_id", "label", "reviewer"],
    DeadLetter: ["schema", "ts", "event_id", "reason", "detail", "original", "original_encoding"],
}


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode("utf-8")


def without(doc: dict[str, Any], dotted: str) -> dict[str, Any]:
    """A deep copy of doc with one (possibly nested) key removed."""
    copy = json.loads(json.dumps(doc))
    *parents, last = dotted.split(".")
    target = copy
    for key in parents:
        target = target[key]
    del target[last]
    return copy


def with_value(doc: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A deep copy of doc with one (possibly nested) key set to value."""
    copy = json.loads(json.dumps(doc))
    *parents, last = dotted.split(".")
    target = copy
    for key in parents:
        target = target[key]
    target[last] = value
    return copy


def schema_validator(message_cls: type) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_schema(message_cls))


# --- round trips ------------------------------------------------------------------


@pytest.mark.parametrize("message_cls", MESSAGE_TYPES, ids=lambda cls: cls.__name__)
def test_wire_document_round_trips_unchanged(message_cls: type) -> None:
    doc = GOOD_DOCS[message_cls]()
    message = PARSERS[message_cls](encode(doc))
    assert isinstance(message, message_cls)
    written = json.loads(to_json_bytes(message))
    # Optional fields the document left out come back as null, nothing else changes.
    assert {key: value for key, value in written.items() if value is not None or key in doc} == doc
    assert parse(message_cls, to_json_bytes(message)) == message


def test_messages_built_in_code_round_trip() -> None:
    messages = [
        UploadEvent(event_id="e", image_id="i", data_b64=base64.b64encode(b"\x89PNG").decode()),
        Verdict(
            event_id="e",
            image_id="i",
            action="allow",
            label="normal",
            score=0.02,
            source="model",
            signals=Signals(knn=0.1, cnn=0.02),
            hashes=Hashes(md5=MD5, pdq=PDQ, pdq_quality=90),
            model_version="b1",
            latency_ms=12,
        ),
        ReviewDecision(image_id="i", label="adult", reviewer="bob"),
        DeadLetter.for_record("e", "too_large", "12 MB > 10 MB", b"\x00\x01"),
    ]
    for message in messages:
        assert parse(type(message), to_json_bytes(message)) == message


def test_serialisation_is_compact_utf8_with_schema_key_and_nulls() -> None:
    event = UploadEvent(event_id="e", image_id="画像-1", uri="s3://bucket/key", ts=TS)
    raw = to_json_bytes(event)
    assert raw.startswith(b'{"schema":1,')
    assert b", " not in raw and b": " not in raw
    assert "画像-1".encode() in raw
    assert json.loads(raw)["data_b64"] is None


def test_timestamp_is_kept_exactly_as_given() -> None:
    given = "2026-11-23T19:00:00.5+09:00"
    assert parse_upload_event(encode(upload_doc(ts=given))).ts == given


def test_timestamp_defaults_to_now_in_utc_when_built_in_code() -> None:
    event = UploadEvent(event_id="e", image_id="i", uri="file:///a")
    assert event.ts.endswith("Z")
    assert schema_validator(UploadEvent).is_valid(json.loads(to_json_bytes(event)))
    assert datetime.fromisoformat(event.ts.replace("Z", "+00:00")).utcoffset() == timedelta(0)
    assert utc_timestamp().endswith("Z")


def test_accepts_str_bytearray_and_memoryview() -> None:
    text = json.dumps(upload_doc())
    expected = parse_upload_event(text)
    assert parse_upload_event(bytearray(text, "utf-8")) == expected
    assert parse_upload_event(memoryview(text.encode())) == expected


def test_hashes_are_normalised_to_lower_case() -> None:
    verdict = parse_verdict(encode(verdict_doc(hashes={"md5": MD5.upper(), "pdq": PDQ.upper(), "pdq_quality": 100,
                                                       "phash": PHASH.upper()})))
    assert verdict.hashes == Hashes(md5=MD5, pdq=PDQ, pdq_quality=100, phash=PHASH)
    assert parse_review_decision(encode(review_doc(md5=MD5.upper()))).md5 == MD5


def test_inline_bytes_decodes_data_b64() -> None:
    payload = bytes(range(256))
    event = parse_upload_event(encode(upload_doc(uri=None, data_b64=base64.b64encode(payload).decode())))
    assert event.inline_bytes() == payload
    assert parse_upload_event(encode(upload_doc())).inline_bytes() is None


def test_messages_are_immutable() -> None:
    event = parse_upload_event(encode(upload_doc()))
    with pytest.raises(ValidationError):
        event.image_id = "other"  # type: ignore[misc]


# --- forward compatibility ----------------------------------------------------------


def test_unknown_fields_are_ignored_top_level_and_nested() -> None:
    doc = verdict_doc(priority="high")
    doc["signals"]["dhash_hamming"] = 4
    verdict = parse_verdict(encode(doc))
    written = json.loads(to_json_bytes(verdict))
    assert "priority" not in written and "dhash_hamming" not in written["signals"]
    assert verdict == parse_verdict(encode(verdict_doc()))


# --- rejection ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message_cls", "field"),
    [(cls, field) for cls, fields in REQUIRED_ON_WIRE.items() for field in fields]
    + [(Verdict, "hashes.md5"), (Verdict, "hashes.pdq"), (Verdict, "hashes.pdq_quality")],
    ids=lambda value: value.__name__ if isinstance(value, type) else value,
)
def test_missing_required_field_is_named(message_cls: type, field: str) -> None:
    raw = encode(without(GOOD_DOCS[message_cls](), field))
    with pytest.raises(MessageError) as caught:
        PARSERS[message_cls](raw)
    assert caught.value.field == field
    assert field in str(caught.value)
    assert not schema_validator(message_cls).is_valid(json.loads(raw))


@pytest.mark.parametrize("message_cls", MESSAGE_TYPES, ids=lambda cls: cls.__name__)
def test_checked_in_schema_requires_exactly_the_wire_required_fields(message_cls: type) -> None:
    assert sorted(load_schema(message_cls)["required"]) == sorted(REQUIRED_ON_WIRE[message_cls])


# (message type, field, bad value, also rejected by the JSON Schema alone)
BAD_VALUES = [
    (UploadEvent, "event_id", 3, True),
    (UploadEvent, "event_id", "", True),
    (UploadEvent, "image_id", None, True),
    (UploadEvent, "uploader_id", 5, True),
    (UploadEvent, "metadata", ["a"], True),
    (UploadEvent, "uri", "no-scheme-here", True),
    (UploadEvent, "ts", "yesterday", True),
    (UploadEvent, "ts", "2026-11-23T10:00:00", True),  # no offset: ambiguous
    (UploadEvent, "ts", "2026-13-23T10:00:00Z", False),  # month 13 fits the pattern
    (UploadEvent, "ts", 1763892000, True),
    (Verdict, "action", "delete", True),
    (Verdict, "label", "nsfw", True),
    (Verdict, "score", "0.9", True),
    (Verdict, "score", True, True),
    (Verdict, "score", 1.5, True),
    (Verdict, "source", "cache", True),
    (Verdict, "signals", "high", True),
    (Verdict, "signals.knn", -0.1, True),
    (Verdict, "signals.pdq_distance", 2.5, True),
    (Verdict, "signals.pdq_distance", 257, True),
    (Verdict, "hashes.pdq", "0" * 63, True),
    (Verdict, "hashes.pdq_quality", 101, True),
    (Verdict, "bank", {"name": "ncmec"}, True),  # a bank on a near_duplicate verdict
    (Verdict, "hashes.md5", "xyz", True),
    (Verdict, "hashes.phash", "0" * 17, True),
    (Verdict, "latency_ms", -1, True),
    (Verdict, "model_version", "", True),
    (ReviewDecision, "label", 1, True),
    (ReviewDecision, "reviewer", ["alice"], True),
    (ReviewDecision, "phash", "not-hex-at-all!!", True),
    (ReviewDecision, "pdq", "f" * 65, True),
    (DeadLetter, "reason", "exploded", True),
    (DeadLetter, "detail", None, True),
    (DeadLetter, "original_encoding", "hex", True),
    (UploadEvent, "event_id", "e" * (MAX_ID_LENGTH + 1), True),
    (UploadEvent, "image_id", "i" * (MAX_ID_LENGTH + 1), True),
    (UploadEvent, "uploader_id", "u" * (MAX_ID_LENGTH + 1), True),
    (UploadEvent, "uri", "https://cdn/" + "x" * MAX_URI_LENGTH, True),
    (DeadLetter, "event_id", "e" * (MAX_DEAD_LETTER_ID_LENGTH + 1), True),
    (DeadLetter, "detail", "d" * (MAX_DETAIL_LENGTH + 1), True),
    (DeadLetter, "original_sha256", "ABC", True),
    (DeadLetter, "original_size", -1, True),
]


@pytest.mark.parametrize(
    ("message_cls", "field", "value", "schema_rejects"),
    BAD_VALUES,
    ids=[f"{cls.__name__}-{field}-{value!r}" for cls, field, value, _ in BAD_VALUES],
)
def test_wrong_value_is_rejected_naming_the_field(
    message_cls: type, field: str, value: Any, schema_rejects: bool
) -> None:
    doc = with_value(GOOD_DOCS[message_cls](), field, value)
    with pytest.raises(MessageError) as caught:
        PARSERS[message_cls](encode(doc))
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert schema_validator(message_cls).is_valid(doc) is not schema_rejects


def test_invalid_base64_payload_is_rejected() -> None:
    for bad in ("AAA", "not base64!", "QUJD\nREVG"):
        with pytest.raises(MessageError) as caught:
            parse_upload_event(encode(upload_doc(uri=None, data_b64=bad)))
        assert caught.value.field == "data_b64"


@pytest.mark.parametrize(
    "doc",
    [
        upload_doc(uri=None, data_b64=None),
        upload_doc(data_b64="QUJD"),
        without(upload_doc(), "uri"),
    ],
    ids=["both-null", "both-set", "neither-present"],
)
def test_exactly_one_of_uri_and_data_b64(doc: dict[str, Any]) -> None:
    with pytest.raises(MessageError) as caught:
        parse_upload_event(encode(doc))
    assert caught.value.field == "uri/data_b64"
    assert "exactly one of uri or data_b64" in caught.value.detail
    assert not schema_validator(UploadEvent).is_valid(doc)


def test_inline_event_with_null_uri_is_valid_for_model_and_schema() -> None:
    doc = upload_doc(uri=None, data_b64="QUJD")
    assert parse_upload_event(encode(doc)).inline_bytes() == b"ABC"
    assert schema_validator(UploadEvent).is_valid(doc)


@pytest.mark.parametrize(
    ("source", "matched_image_id"),
    [("exact_duplicate", None), ("near_duplicate", None), ("model", "img-0")],
)
def test_matched_image_id_must_agree_with_source(source: str, matched_image_id: str | None) -> None:
    doc = verdict_doc(source=source, matched_image_id=matched_image_id)
    with pytest.raises(MessageError) as caught:
        parse_verdict(encode(doc))
    assert caught.value.field == "matched_image_id"
    assert not schema_validator(Verdict).is_valid(doc)


@pytest.mark.parametrize(
    ("raw", "expected_detail"),
    [
        (b"\xff\xfe{}", "not UTF-8"),
        (b"", "not valid JSON"),
        (b"{'single': 'quotes'}", "not valid JSON"),
        (b'{"schema": 1} trailing', "not valid JSON"),
        (b'{"schema": 1, "score": NaN}', "not valid JSON"),
        (b'{"event_id": "\\ud800"}', "not valid JSON"),
        (b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'"text"', "expected a JSON object, got str"),
        (b"null", "expected a JSON object, got NoneType"),
    ],
    ids=[
        "not-utf8",
        "empty",
        "python-repr",
        "trailing",
        "nan",
        "lone-surrogate",
        "deep",
        "array",
        "string",
        "null",
    ],
)
def test_undecodable_records_raise_message_error_only(raw: bytes, expected_detail: str) -> None:
    for parser in PARSERS.values():
        with pytest.raises(MessageError) as caught:
            parser(raw)
        assert caught.value.field is None
        assert caught.value.detail.startswith(expected_detail)


@pytest.mark.parametrize("version", [2, 0, "1", True, None, 1.5])
def test_wrong_schema_version_is_rejected(version: Any) -> None:
    for message_cls, make_doc in GOOD_DOCS.items():
        doc = make_doc(schema=version)
        with pytest.raises(MessageError) as caught:
            PARSERS[message_cls](encode(doc))
        assert caught.value.field == "schema"
        assert not schema_validator(message_cls).is_valid(doc)


def test_several_problems_report_the_first_and_count_the_rest() -> None:
    with pytest.raises(MessageError) as caught:
        parse_verdict(encode(verdict_doc(score=7, label="x", action="y")))
    assert caught.value.field == "action"
    assert caught.value.detail.endswith("(and 2 more problems)")


def test_message_error_is_a_modstream_error() -> None:
    assert issubclass(MessageError, ModstreamError)
    error = MessageError("Field required", "event_id")
    assert (error.field, error.detail, str(error)) == (
        "event_id",
        "Field required",
        "event_id: Field required",
    )
    assert str(MessageError("not valid JSON")) == "not valid JSON"


# --- dead letters -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "encoding", "original"),
    [
        (b'{"event_id": "e", "uri": 5}', "json", {"event_id": "e", "uri": 5}),
        (b'"just a string"', "json", "just a string"),
        (b"\x89PNG\r\n\x1a\n", "base64", base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()),
        (b"{not json", "base64", base64.b64encode(b"{not json").decode()),
        (b"[" * 300 + b"]" * 300, "base64", base64.b64encode(b"[" * 300 + b"]" * 300).decode()),
        (None, "absent", None),
    ],
    ids=["json-object", "json-string", "binary", "broken-json", "too-deep", "tombstone"],
)
def test_dead_letter_keeps_the_original_record(raw: bytes | None, encoding: str, original: Any) -> None:
    letter = DeadLetter.for_record("topic-0@7", "invalid_event", "bad", raw)
    assert (letter.original_encoding, letter.original) == (encoding, original)
    assert not letter.original_truncated
    if raw is None:
        assert (letter.original_size, letter.original_sha256) == (None, None)
    else:
        assert (letter.original_size, letter.original_sha256) == (len(raw), hashlib.sha256(raw).hexdigest())
    wire = to_json_bytes(letter)
    assert parse_dead_letter(wire) == letter
    assert schema_validator(DeadLetter).is_valid(json.loads(wire))
    if encoding == "base64":
        assert base64.b64decode(letter.original) == raw


HUGE = 4 * 1024 * 1024


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps({"schema": 1, "event_id": "e1", "data_b64": "A" * HUGE}).encode(),
        json.dumps({"event_id": "e" * HUGE, "image_id": "i" * HUGE, "uploader_id": "u" * HUGE}).encode(),
        json.dumps({"k" * HUGE: 1}).encode(),
        json.dumps(list(range(HUGE // 8))).encode(),
        json.dumps({"metadata": {str(i): "v" * 1000 for i in range(2000)}}).encode(),
        b"\xff" * HUGE,
        b'{"truncated json' + b" " * HUGE,
        b"\x00" * HUGE,
    ],
    ids=["inline-image", "huge-ids", "huge-key", "long-array", "wide-metadata", "binary", "broken-json", "zeros"],
)
def test_dead_letter_of_a_huge_record_is_bounded_and_describes_the_whole(raw: bytes) -> None:
    letter = DeadLetter.for_record("x" * MAX_DEAD_LETTER_ID_LENGTH, "too_large", "d" * 100_000, raw)
    wire = to_json_bytes(letter)
    assert len(wire) <= 2 * MAX_ORIGINAL_BYTES + 2 * MAX_DETAIL_LENGTH + 1024  # fits any topic
    assert letter.original_truncated
    assert (letter.original_size, letter.original_sha256) == (len(raw), hashlib.sha256(raw).hexdigest())
    assert len(letter.detail) == MAX_DETAIL_LENGTH
    assert parse_dead_letter(wire) == letter
    assert schema_validator(DeadLetter).is_valid(json.loads(wire))


def test_a_large_inline_image_keeps_the_rest_of_its_event_readable() -> None:
    data = base64.b64encode(b"\xff" * 100_000).decode()
    raw = json.dumps({"schema": 1, "event_id": "e1", "image_id": "i", "data_b64": data}).encode()
    letter = DeadLetter.for_record("e1", "too_large", "too big", raw)
    assert letter.original_encoding == "json" and letter.original_truncated
    assert letter.original["event_id"] == "e1" and letter.original["image_id"] == "i"
    assert letter.original["data_b64"].startswith(data[:256])
    assert letter.original["data_b64"].endswith(f"[{len(data)} characters]")


SECRETS = ("hunter2", "s3cr3t-sig", "tok-123", "AKIA-cred")


@pytest.mark.parametrize(
    "uri",
    [
        "https://bob:hunter2@cdn.example/x.jpg",
        "https://cdn.example/x.jpg?X-Amz-Signature=s3cr3t-sig&size=1",
        "https://cdn.example/x.jpg?size=1&access_token=tok-123",
        "s3://bucket/x.jpg?X-Amz-Credential=AKIA-cred;sig=s3cr3t-sig",
        "http://:hunter2@[::1/x",
    ],
)
def test_credentials_in_urls_never_reach_a_dead_letter(uri: str) -> None:
    document = {"schema": 1, "event_id": "e1", "image_id": "i", "uri": uri, "metadata": {"source": uri}}
    as_json = DeadLetter.for_record("e1", "fetch_failed", f"cannot fetch {uri}", json.dumps(document).encode())
    as_bytes = DeadLetter.for_record("e1", "invalid_event", f"bad {uri}", b"\xff" + json.dumps(document).encode())
    for letter in (as_json, as_bytes):
        wire = to_json_bytes(letter)
        decoded = wire + (base64.b64decode(letter.original) if letter.original_encoding == "base64" else b"")
        assert not any(secret.encode() in decoded for secret in SECRETS), decoded
        assert b"[redacted]" in decoded
    assert as_json.original["uri"].startswith(uri.split(":")[0] + "://")


def test_redaction_keeps_urls_without_credentials() -> None:
    plain = "https://cdn.example/a/b.jpg?size=12&format=webp#top"
    assert redact_credentials(plain) == plain
    assert redact_credentials("file:///tmp/a%00b.jpg") == "file:///tmp/a%00b.jpg"


def test_dead_letter_event_id_helpers() -> None:
    assert record_placeholder_id("images.uploads", 3, 1042) == "images.uploads-3@1042"
    assert peek_event_id(encode(upload_doc(uri=5))) == "ev-1"
    assert peek_event_id(b'{"event_id": ""}') is None
    assert peek_event_id(b'{"event_id": 12}') is None
    assert peek_event_id(b"\xff") is None
    assert peek_event_id(json.dumps({"event_id": "e" * (MAX_ID_LENGTH + 1)}).encode()) is None
    assert peek_event_id(None) is None


# --- constants ----------------------------------------------------------------------


def test_label_ids_are_fixed() -> None:
    assert LABELS == ("normal", "adult")
    assert LABEL_IDS == {"normal": 0, "adult": 1}


# --- checked-in JSON Schemas --------------------------------------------------------


def test_checked_in_schema_files_are_current() -> None:
    assert stale_schema_files() == [], "run: python -m common.schemas"
    for message_cls in MESSAGE_TYPES:
        assert load_schema(message_cls) == build_schema(message_cls)
        assert json.loads(render_schema(message_cls))["$id"].startswith("urn:modstream:schema:")


@pytest.mark.parametrize("message_cls", MESSAGE_TYPES, ids=lambda cls: cls.__name__)
def test_checked_in_schema_is_valid_and_accepts_a_good_message(message_cls: type) -> None:
    schema = load_schema(message_cls)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = schema_validator(message_cls)
    validator.validate(GOOD_DOCS[message_cls]())
    validator.validate(json.loads(to_json_bytes(parse(message_cls, encode(GOOD_DOCS[message_cls]())))))
    validator.validate(GOOD_DOCS[message_cls](future_field={"nested": True}))
