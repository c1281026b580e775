"""The scorer without Kafka or Ray: loading hostile records, per-record failures, bounded
retries that isolate the record to blame, and waiting for dependencies that are down."""

from __future__ import annotations

import base64
import io
import json
import math
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.dedupstate import Entry, Match
from common.fetch import LoadLimits
from common.fusion import Thresholds
from common.knownfeatures import KnownFeatures, has_model_input
from common.messages import DeadLetter
from workers.scorer import (
    Item,
    Lookups,
    ModelScore,
    Scored,
    Scorer,
    Stopping,
    Unavailable,
    image_features,
    load_record,
)

SAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "samples"
LIMITS = LoadLimits(max_bytes=1_000_000, max_pixels=10_000_000, fetch_timeout_s=2.0)
DRAFT = (256, 256)
TRUNCATED_JPEG = sorted(SAMPLES.glob("*.jpg"))[0].read_bytes()[:1500]


def model_input(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((8, 8)), dtype=np.uint8)


@dataclass
class Record:
    value: bytes | None
    offset: int = 0
    timestamp: int = 1_000
    topic: str = "uploads"
    partition: int = 0


def event(image_id: str = "img", **fields: object) -> bytes:
    document = {"schema": 1, "event_id": str(uuid.uuid4()), "image_id": image_id, "ts": "2026-11-23T10:00:00Z",
                **fields}
    return json.dumps(document).encode()


def image_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def item(seed: int, image_id: str | None = None, timestamp: int = 1_000, known: KnownFeatures | None = None) -> Item:
    data = base64.b64encode(image_bytes(seed)).decode()
    loaded = load_record(Record(event(image_id or f"img-{seed}", data_b64=data), timestamp=timestamp), LIMITS, DRAFT,
                         model_input, known)
    assert isinstance(loaded, Item), loaded
    return loaded


class Fusion:
    """Score = the CNN signal; NaN for a CNN score of exactly 0.25."""

    def predict(self, signals: dict) -> float:
        return math.nan if signals["cnn"] == 0.25 else float(signals["cnn"])


class Fakes:
    def __init__(self, cnn_scores: dict[str, float] | None = None) -> None:
        self.cnn_scores = cnn_scores or {}
        self.dedup_calls: list[list] = []
        self.classified = 0
        self.review_waits: list[int] = []
        self.dedup_failures: list[Exception] = []
        self.poison: str | None = None
        self.matches: dict[str, Match] = {}  # by md5
        self.features_of_calls = 0
        self.features_of_failure: Exception | None = None

    def dedup(self, queries: list) -> list:
        self.dedup_calls.append(queries)
        if self.dedup_failures:
            raise self.dedup_failures.pop(0)
        if self.poison and any(query[3] == self.poison for query in queries):
            raise ValueError(f"shard cannot store {self.poison}")
        return [self.matches.get(query[0]) for query in queries]

    def knn(self, histograms: list) -> object:
        return lambda: [0.5] * len(histograms)

    def classify(self, images: list) -> list[ModelScore]:
        self.classified += len(images)
        return scores([0.1] * len(images))

    def wait_for_reviews(self, until_ms: int) -> bool:
        self.review_waits.append(until_ms)
        return True

    def features_of(self, data: bytes) -> object:
        self.features_of_calls += 1
        if self.features_of_failure is not None:
            raise self.features_of_failure
        return image_features(data, LIMITS, DRAFT, model_input)

    def scorer(self, classify=None, should_stop=lambda: False) -> Scorer:
        lookups = Lookups(dedup=self.dedup, knn=self.knn, classify=classify or self.classify,
                          wait_for_reviews=self.wait_for_reviews, features_of=self.features_of)
        return Scorer(lookups, "bundle-1", pdq_max_distance=31, attempts=3, should_stop=should_stop,
                      sleep=lambda s: None)


def scores(cnn: list[float]) -> list[ModelScore]:
    return [ModelScore(c, "bundle-2", Fusion(), Thresholds(block=0.9, review=0.5), "bundle") for c in cnn]


def reasons(outcomes: list) -> list[str]:
    return [o.reason if isinstance(o, DeadLetter) else o.verdict.action for o in outcomes]


def test_every_item_gets_a_verdict_and_reviews_are_synced_to_the_newest_record() -> None:
    fakes = Fakes()
    items = [item(1, timestamp=5_000), item(2, timestamp=9_000), item(3, timestamp=7_000)]
    outcomes = fakes.scorer().score(items)
    assert [o.verdict.event_id for o in outcomes] == [i.event.event_id for i in items]
    assert all(isinstance(o, Scored) and o.verdict.source == "model" for o in outcomes)
    assert fakes.review_waits == [9_000] and fakes.classified == 3
    assert {(o.verdict.model_version, o.verdict.signals.thresholds) for o in outcomes} == {("bundle-2", "bundle")}


def test_copies_inside_a_batch_reach_the_model_once() -> None:
    fakes = Fakes()
    outcomes = fakes.scorer().score([item(1), item(1, image_id="copy")])
    assert [o.verdict.source for o in outcomes] == ["model", "exact_duplicate"]
    assert outcomes[1].verdict.matched_image_id == "img-1" and fakes.classified == 1


def test_bytes_loaded_before_keep_their_features_and_skip_the_decode(monkeypatch) -> None:
    known = KnownFeatures(10)
    first = item(1, known=known)
    monkeypatch.setattr("workers.scorer.decode_image", lambda *args, **kwargs: pytest.fail("decoded again"))
    copy = item(1, image_id="copy", known=known)
    assert known.hits == 1 and copy.data == image_bytes(1) and first.data is None
    assert has_model_input(first.features) and not has_model_input(copy.features)
    for name in ("md5", "pdq", "pdq_quality", "pdq_variants", "phash", "width", "height"):
        assert getattr(copy.features, name) == getattr(first.features, name), name
    np.testing.assert_array_equal(copy.features.histogram, first.features.histogram)


@pytest.mark.parametrize("data", [TRUNCATED_JPEG, b"\x00" * 64], ids=["truncated-jpeg", "not-an-image"])
def test_bytes_that_failed_to_load_are_never_known_and_fail_again(data: bytes) -> None:
    """A producer repeating a bad upload gets a dead letter every time: only bytes that
    decoded are remembered, so nothing hostile is ever answered from the cache."""
    known = KnownFeatures(10)
    value = event("bad", data_b64=base64.b64encode(data).decode())
    outcomes = [load_record(Record(value), LIMITS, DRAFT, model_input, known) for _ in range(2)]
    assert all(isinstance(o, DeadLetter) and o.reason in {"decode_failed", "unsupported_format"} for o in outcomes)
    assert len(known) == 0 and known.hits == 0


def test_a_known_copy_matched_in_dedup_is_never_decoded() -> None:
    known, fakes = KnownFeatures(10), Fakes()
    original = item(1, known=known)
    entry = Entry(md5=original.features.md5, pdq=original.features.pdq, pdq_quality=100, image_id="img-1",
                  event_key=1, action="block", label="adult", score=0.97)
    fakes.matches[original.features.md5] = Match("exact", entry, 0)
    outcomes = fakes.scorer().score([item(1, image_id="copy", known=known)])
    assert [(o.verdict.source, o.verdict.action) for o in outcomes] == [("exact_duplicate", "block")]
    assert outcomes[0].verdict.hashes.md5 == original.features.md5
    assert fakes.features_of_calls == 0 and fakes.classified == 0


def test_a_known_copy_whose_original_is_gone_from_dedup_is_decoded_again_for_the_model() -> None:
    known, fakes = KnownFeatures(10), Fakes()
    item(1, known=known)
    item(2, known=known)
    outcomes = fakes.scorer().score([item(1, image_id="a", known=known), item(3), item(1, image_id="b", known=known)])
    assert [o.verdict.source for o in outcomes] == ["model", "model", "exact_duplicate"]
    assert fakes.features_of_calls == 1 and fakes.classified == 2  # the leader only; its twin follows it
    fakes.features_of_failure = RuntimeError("decoder gone")
    outcomes = fakes.scorer().score([item(2, image_id="c", known=known), item(4)])
    assert reasons(outcomes) == ["processing_failed", "allow"]
    assert outcomes[0].detail == "RuntimeError: decoder gone"


def test_a_nan_fusion_score_is_a_dead_letter_not_an_allow() -> None:
    fakes = Fakes()
    outcomes = fakes.scorer(classify=lambda images: scores([0.1, 0.25, 0.95][: len(images)])).score(
        [item(1), item(2), item(3)])
    assert reasons(outcomes) == ["allow", "processing_failed", "block"]
    assert outcomes[1].detail.startswith("ValueError: fusion returned nan")
    assert "Traceback" not in outcomes[1].detail and outcomes[1].original_encoding == "json"


def test_a_nan_cnn_signal_fails_only_its_own_verdict() -> None:
    fakes = Fakes()
    outcomes = fakes.scorer(classify=lambda images: scores([math.nan, 0.1][: len(images)])).score([item(1), item(2)])
    assert reasons(outcomes) == ["processing_failed", "allow"]
    assert outcomes[0].detail.startswith("ValueError: fusion returned nan") or "ValidationError" in outcomes[0].detail


def test_a_record_that_keeps_failing_a_batch_step_is_isolated_and_dead_lettered() -> None:
    fakes = Fakes()
    fakes.poison = "img-3"
    items = [item(seed) for seed in range(1, 7)]
    outcomes = fakes.scorer().score(items)
    assert reasons(outcomes) == ["allow", "allow", "processing_failed", "allow", "allow", "allow"]
    assert outcomes[2].detail == "ValueError: shard cannot store img-3"
    assert len(fakes.dedup_calls) <= 3 + 2 * math.ceil(math.log2(len(items))) + 1  # bounded, never forever


def test_a_failure_that_does_not_recur_is_retried_without_dead_letters() -> None:
    fakes = Fakes()
    fakes.dedup_failures = [RuntimeError("flaky")]
    outcomes = fakes.scorer().score([item(1), item(2)])
    assert reasons(outcomes) == ["allow", "allow"] and len(fakes.dedup_calls) == 2


def test_an_unavailable_dependency_is_waited_for_and_blames_no_record() -> None:
    fakes = Fakes()
    fakes.dedup_failures = [Unavailable("shard restarting")] * 10
    outcomes = fakes.scorer().score([item(1)])
    assert reasons(outcomes) == ["allow"] and len(fakes.dedup_calls) == 11


def test_stopping_while_a_dependency_is_down_leaves_the_batch_unscored() -> None:
    fakes = Fakes()
    fakes.dedup_failures = [Unavailable("shard restarting")] * 10
    with pytest.raises(Stopping):
        fakes.scorer(should_stop=lambda: True).score([item(1)])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"\x00\xffnot json", {"invalid_event"}),
        (b"[1, 2, 3]", {"invalid_event"}),
        (None, {"invalid_event"}),
        (event("i", data_b64="not base64!"), {"invalid_event"}),
        (event("i", data_b64=""), {"invalid_event"}),
        (event("i" * 100_000, data_b64="AAAA"), {"invalid_event"}),
        (event("i", uri="file:///tmp/a%00b.jpg"), {"fetch_failed"}),
        (event("i", uri="http://[::1/x"), {"fetch_failed"}),
        (event("i", uri="file://[/x"), {"fetch_failed"}),
        (event("i", data_b64=base64.b64encode(TRUNCATED_JPEG).decode()), {"decode_failed"}),
        (event("i", data_b64=base64.b64encode(b"\x00").decode()), {"decode_failed", "unsupported_format"}),
    ],
    ids=["binary", "array", "tombstone", "bad-base64", "empty-base64", "huge-id", "null-byte-uri",
         "broken-ipv6", "broken-file-host", "truncated-jpeg", "one-byte"],
)
def test_hostile_records_become_dead_letters_with_their_reason(value: bytes | None, expected: set[str]) -> None:
    loaded = load_record(Record(value, offset=7), LIMITS, DRAFT, model_input)
    assert isinstance(loaded, DeadLetter) and loaded.reason in expected, loaded
    assert len(loaded.event_id) <= 320 and "Traceback" not in loaded.detail


def test_anything_a_loader_raises_is_a_processing_failed_dead_letter(monkeypatch) -> None:
    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr("workers.scorer.decode_image", explode)
    value = event("i", data_b64=base64.b64encode(image_bytes(1)).decode())
    loaded = load_record(Record(value), LIMITS, DRAFT, model_input)
    assert isinstance(loaded, DeadLetter)
    assert (loaded.reason, loaded.detail) == ("processing_failed", "RuntimeError: decoder exploded")
    assert loaded.event_id == json.loads(value)["event_id"]
