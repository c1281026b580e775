"""Fuzzing of what producers control: image bytes (decode) and record values (the message
parsers). hypothesis, derandomized so every run tries the same inputs, and sized to take a few
seconds each. Whatever a fuzzer (this one, or a longer run of it) found to crash is kept under
tests/fuzz_regressions/ and replayed here: decode/*.bin through decode_image, messages/*.bin
through every parse_* function.

A longer search, to run by hand: MODSTREAM_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, features

from common.decode import decode_image, decode_in_process
from common.fetch import IMAGE_FORMATS, LoadLimits
from common.loaderrors import LoadError
from common.messages import (
    MessageError,
    parse_dead_letter,
    parse_review_decision,
    parse_upload_event,
    parse_verdict,
    peek_event_id,
    to_json_bytes,
)
from tests.synthetic_data import encode

REGRESSIONS = Path(__file__).parent / "fuzz_regressions"
EXAMPLES = int(os.environ.get("MODSTREAM_FUZZ_EXAMPLES", "200"))
LIMITS = LoadLimits(formats=IMAGE_FORMATS, max_pixels=4_000_000, decode_memory_bytes=64 << 20)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PARSERS: list[Callable[[bytes], object]] = [parse_upload_event, parse_verdict, parse_review_decision,
                                            parse_dead_letter]



def seed_images() -> list[bytes]:
    """Small valid files of every format and the odd modes, for the fuzzer to mutate."""
    rgb = Image.radial_gradient("L").resize((24, 16)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    seeds = [
        encode(rgb, "JPEG", quality=80), encode(rgb, "JPEG", progressive=True, exif=exif.tobytes()),
        encode(rgb.convert("CMYK"), "JPEG"), encode(rgb.convert("RGBA"), "PNG"),
        encode(rgb.convert("P"), "PNG", transparency=0), encode(Image.new("I;16", (8, 8), 999), "PNG"),
        encode(rgb.convert("P"), "GIF", save_all=True, append_images=[rgb.convert("P")] * 2),
        encode(rgb, "BMP"), encode(Image.new("F", (8, 8), 0.25), "TIFF"),
        encode(rgb, "TIFF", compression="tiff_lzw"),
    ]
    if features.check("webp"):
        seeds += [encode(rgb.convert("RGBA"), "WEBP"), encode(rgb, "WEBP", lossless=True)]
    if features.check("avif"):
        seeds.append(encode(rgb, "AVIF"))
    return seeds


SEEDS = seed_images()


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A seed image with a few byte-level mutations: what a fuzzer feeds a decoder."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["set", "insert", "delete", "repeat", "truncate", "extreme"]))
        if kind == "set":
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif kind == "repeat":
            data[at:at] = data[at:at + draw(st.integers(1, 32))] * draw(st.integers(1, 50))
        elif kind == "truncate":
            del data[at:]
        else:  # a length, size or count field turned to its extremes
            data[at:at + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff"]))
    return bytes(data)


def assert_answers(decode: Callable[..., Image.Image], data: bytes) -> None:
    """An RGB image within the limits, or a LoadError: nothing else may come out of a decode."""
    try:
        image = decode(data, LIMITS, draft_to=(16, 16))
    except LoadError:
        return
    assert image.mode == "RGB"
    assert 0 < image.width * image.height <= LIMITS.max_pixels


@FUZZ
@given(mutated_images())
def test_fuzz_decode_in_process(data: bytes) -> None:
    """In this process: an exception escaping the checks shows here, not as a dead worker."""
    assert_answers(decode_in_process, data)


@settings(FUZZ, max_examples=max(20, EXAMPLES // 5))
@given(mutated_images())
def test_fuzz_decode_image(data: bytes) -> None:
    assert_answers(decode_image, data)


FIELDS = ["schema", "event_id", "image_id", "uri", "data_b64", "ts", "metadata", "action", "label", "score",
          "source", "matched_image_id", "signals", "hashes", "model_version", "latency_ms", "reviewer", "md5",
          "phash", "reason", "detail", "original", "original_encoding", "knn", "cnn", "hamming", "bank",
          "supersedes", "pdq", "pdq_quality"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20) | st.sampled_from(["1", "2026-11-23T10:00:00Z", "2026-02-30T10:00:00+99:00", "allow",
                                               "adult", "model", "fetch_failed", "json", "a" * 32, "0" * 16,
                                               "aGVsbG8=", "file:///x.jpg", "\udcff", "9" * 5000]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(FIELDS), children, max_size=3),
    max_leaves=6,
)
TS = "2026-11-23T10:00:00Z"
TEMPLATES = [
    {"schema": 1, "event_id": "e", "image_id": "i", "uri": "file:///x.jpg", "ts": TS},
    {"schema": 1, "event_id": "e", "image_id": "i", "data_b64": "aGVsbG8=", "metadata": {"k": "v"}, "ts": TS},
    {"schema": 1, "image_id": "i", "label": "adult", "reviewer": "r", "md5": "a" * 32, "ts": TS},
    {"schema": 1, "event_id": "e", "reason": "fetch_failed", "detail": "d", "original": None,
     "original_encoding": "absent", "ts": TS},
]


@st.composite
def records(draw: st.DrawFn) -> bytes:
    """Record values: valid messages with a few fields changed or removed, sometimes raw bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    document = dict(draw(st.sampled_from(TEMPLATES)))
    for _ in range(draw(st.integers(0, 4))):
        field = draw(st.sampled_from(FIELDS))
        if draw(st.integers(0, 3)) == 0:
            document.pop(field, None)
        else:
            document[field] = draw(JSON_VALUES)
    return json.dumps(document, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


def assert_parses_or_refuses(raw: bytes) -> None:
    """Every parser answers a message that survives its own serialisation, or a MessageError."""
    for parse in PARSERS:
        try:
            message = parse(raw)
        except MessageError:
            continue
        assert parse(to_json_bytes(message)) == message  # type: ignore[arg-type]
    event_id = peek_event_id(raw)
    assert event_id is None or (isinstance(event_id, str) and event_id)


@FUZZ
@given(records())
def test_fuzz_message_parsers(raw: bytes) -> None:
    assert_parses_or_refuses(raw)


def regression_cases(kind: str) -> list[Path]:
    return sorted((REGRESSIONS / kind).glob("*.bin"))


@pytest.mark.parametrize("case", regression_cases("decode"), ids=lambda path: path.name)
def test_decode_regressions(case: Path) -> None:
    data = case.read_bytes()
    assert_answers(decode_in_process, data)
    assert_answers(decode_image, data)


@pytest.mark.parametrize("case", regression_cases("messages"), ids=lambda path: path.name)
def test_message_regressions(case: Path) -> None:
    assert_parses_or_refuses(case.read_bytes())
