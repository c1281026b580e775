"""Scoring: from a polled record to a Verdict or a DeadLetter, with no Kafka and no Ray.

Two halves, both pure logic over what they are given:

- ``load_record`` validates, fetches, decodes and hashes one record (bytes it
  has seen lately keep their features: common.knownfeatures). It never raises:
  whatever goes wrong becomes a dead letter for that record.
- ``Scorer`` turns a batch of loaded items into outcomes (a verdict or a dead
  letter each) through injected lookups: review sync, dedup, kNN and CNN.
  A step that fails for the whole batch is tried ``attempts`` times, then the
  batch is split in halves until the record to blame is found and
  dead-lettered as ``processing_failed``; a dependency that reports itself
  ``Unavailable`` is waited for instead, because no record is to blame.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from common import metrics
from common.decisions import (
    Decision,
    batch_copies,
    decide_as_copy,
    decide_from_match,
    decide_from_model,
    to_verdict,
    variants,
)
from common.decode import decode_image
from common.dedupstate import Match
from common.errors import ModstreamError
from common.features import ImageFeatures, extract_features, md5_hex
from common.fetch import LoadLimits, fetch_bytes
from common.fusion import FusionTree, Thresholds
from common.knownfeatures import KnownFeatures, has_model_input
from common.loaderrors import LoadError
from common.messages import (
    DeadLetter,
    DeadLetterReason,
    MessageError,
    UploadEvent,
    Verdict,
    parse_upload_event,
    peek_event_id,
    record_placeholder_id,
)

log = logging.getLogger(__name__)

LOOKUP_RESULTS = {"exact": "exact", "near": "near", "image_review": "review", "bank": "bank"}
MAX_BACKOFF_S = 5.0

Query = tuple[str, tuple[int, ...], int, str]  # md5, PDQ variants, PDQ quality, image_id (workers.dedup.lookup_all)


class Unavailable(ModstreamError):
    """A dependency (an actor, Serve, the broker) is down or restarting: wait, blame no record."""


class Stopping(ModstreamError):
    """The worker is stopping while a batch waited for a dependency; the batch stays uncommitted."""


class RecordLike(Protocol):
    """What scoring reads of a consumed record (kafka-python's ConsumerRecord has it)."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    value: bytes | None


@dataclass
class Item:
    """An accepted event with its features, waiting for a verdict."""

    event: UploadEvent
    features: ImageFeatures
    timestamp_ms: int
    raw: bytes  # the record value, for a dead letter if scoring it fails
    data: bytes | None = None  # the image, kept while its features lack the model input (from KnownFeatures)


@dataclass(frozen=True)
class Scored:
    """An item with its decision and the verdict built from it."""

    item: Item
    decision: Decision
    verdict: Verdict


Outcome = Scored | DeadLetter


def describe(exc: BaseException) -> str:
    """The detail of a processing_failed dead letter: the error's type and message, no traceback."""
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def dead_letter(record: RecordLike, reason: DeadLetterReason, detail: str, event_id: str | None = None
                ) -> DeadLetter:
    """A dead letter for a record; if even that fails, one without the record's value."""
    event_id = event_id or _record_event_id(record)
    try:
        return DeadLetter.for_record(event_id, reason, detail, record.value)
    except Exception as exc:  # a record must never get no answer
        log.warning("dead letter for %s[%d]@%d without its value: %s", record.topic, record.partition,
                    record.offset, describe(exc))
        placeholder = record_placeholder_id(record.topic, record.partition, record.offset)
        return DeadLetter.for_record(placeholder, reason, detail, None)


def _record_event_id(record: RecordLike) -> str:
    try:
        found = peek_event_id(record.value)
    except Exception:  # the id only names the dead letter; the placeholder does as well
        found = None
    return found or record_placeholder_id(record.topic, record.partition, record.offset)


ModelInput = Callable[[Any], np.ndarray]  # a decoded PIL image to the CNN's uint8 input


def load_record(record: RecordLike, limits: LoadLimits, draft: tuple[int, int], model_input: ModelInput,
                known: KnownFeatures | None = None) -> Item | DeadLetter:
    """Validate and load one record; any failure is a dead letter for it, never an exception.

    With ``known``, bytes loaded before are not decoded again: the item gets their features
    without the model input, and keeps the bytes in case it must go to the model after all."""
    try:
        return _load(record, limits, draft, model_input, known)
    except Exception as exc:
        log.warning("processing %s[%d]@%d failed: %s", record.topic, record.partition, record.offset,
                    describe(exc))
        return dead_letter(record, "processing_failed", describe(exc))


def _load(record: RecordLike, limits: LoadLimits, draft: tuple[int, int], model_input: ModelInput,
          known: KnownFeatures | None) -> Item | DeadLetter:
    raw = record.value
    try:
        event = parse_upload_event(raw if raw is not None else b"")
    except MessageError as exc:
        return dead_letter(record, "invalid_event", str(exc))
    try:
        started = time.perf_counter()
        data = event.inline_bytes()
        if data is None:
            data = fetch_bytes(event.uri, limits)
            metrics.STAGE_LATENCY.labels(stage="fetch").observe(time.perf_counter() - started)
        md5 = md5_hex(data)
        seen = known.get(md5) if known is not None else None
        if seen is not None:
            return Item(event, seen, record.timestamp, bytes(raw or b""), data)
        features = image_features(data, limits, draft, model_input, md5)
        if known is not None:
            known.put(features)
    except LoadError as exc:
        return dead_letter(record, exc.reason, exc.detail, event.event_id)
    except Exception as exc:
        log.warning("processing event %s failed: %s", event.event_id, describe(exc))
        return dead_letter(record, "processing_failed", describe(exc), event.event_id)
    return Item(event, features, record.timestamp, bytes(raw or b""))


def image_features(data: bytes, limits: LoadLimits, draft: tuple[int, int], model_input: ModelInput,
                   md5: str | None = None) -> ImageFeatures:
    """Decode (in a budgeted worker) and compute every feature; a bad image raises LoadError."""
    started = time.perf_counter()
    image = decode_image(data, limits, draft_to=draft)
    decoded = time.perf_counter()
    features = extract_features(data, image, image.size, model_input, md5)
    metrics.STAGE_LATENCY.labels(stage="decode").observe(decoded - started)
    metrics.STAGE_LATENCY.labels(stage="hash").observe(time.perf_counter() - decoded)
    return features


def processing_failed(item: Item, exc: BaseException) -> DeadLetter:
    return DeadLetter.for_record(item.event.event_id, "processing_failed", describe(exc), item.raw)


@dataclass(frozen=True)
class ModelScore:
    """The CNN's P(adult) for one image, with the rules of the bundle whose replica computed it."""

    cnn: float
    bundle_id: str
    fusion: Any  # FusionTree, or anything with its predict()
    thresholds: Thresholds
    thresholds_source: str  # "bundle", "settings" or "default" (Signals.thresholds)


@dataclass(frozen=True)
class Lookups:
    """What scoring asks of the rest of the pipeline (Ray actors in production, fakes in tests).

    ``knn`` starts a query and returns a function that waits for its answer,
    so the kNN vote and the CNN run at the same time. ``features_of`` decodes and hashes an
    image again, for an exact copy loaded from KnownFeatures that must go to the model after all.
    """

    dedup: Callable[[list[Query]], list[Match | None]]
    knn: Callable[[list[np.ndarray]], Callable[[], list[float | None]]]
    classify: Callable[[list[np.ndarray]], list[ModelScore]]
    wait_for_reviews: Callable[[int], bool]
    features_of: Callable[[bytes], ImageFeatures]


class FiniteFusion:
    """The fusion tree, refusing to score NaN or infinity.

    ``decide_from_model`` clamps the score into [0, 1], and a NaN would pass
    the clamp as 0 (allow). Raising here makes it a dead letter instead.
    """

    def __init__(self, tree: FusionTree) -> None:
        self.tree = tree

    def predict(self, signals: dict[str, Any]) -> float:
        score = float(self.tree.predict(signals))
        if not math.isfinite(score):
            raise ValueError(f"fusion returned {score} for knn={signals.get('knn')} cnn={signals.get('cnn')}")
        return score


class Scorer:
    """Items to outcomes, in order; one outcome per item."""

    def __init__(self, lookups: Lookups, bundle_id: str, pdq_max_distance: int, dihedral: bool = False,
                 attempts: int = 3,
                 should_stop: Callable[[], bool] = lambda: False,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.lookups = lookups
        self.bundle_id = bundle_id
        self.pdq_max_distance = pdq_max_distance
        self.dihedral = dihedral
        self.attempts = attempts
        self.should_stop = should_stop
        self.sleep = sleep

    def score(self, items: list[Item]) -> list[Outcome]:
        """One verdict or dead letter per item; raises Stopping if asked to stop while waiting."""
        if not items:
            return []
        self.lookups.wait_for_reviews(max(item.timestamp_ms for item in items))
        return self._score_isolating(items, self.attempts)

    def _score_isolating(self, items: list[Item], attempts: int) -> list[Outcome]:
        """Try the batch; when it keeps failing, split it until the failing record stands alone."""
        failure: Exception | None = None
        tries = 0
        unavailable = 0
        while tries < attempts:
            try:
                return self._score_once(items)
            except Unavailable as exc:
                unavailable += 1
                self._wait("score", exc, unavailable)
            except Exception as exc:
                failure, tries = exc, tries + 1
                metrics.BATCH_RETRIES.labels(step="score").inc()
                log.warning("scoring %d items failed (attempt %d of %d): %s", len(items), tries, attempts,
                            describe(exc))
                if tries < attempts:
                    self.sleep(min(MAX_BACKOFF_S, 0.2 * 2**tries))
        assert failure is not None
        if len(items) == 1:
            log.error("event %s dead-lettered: scoring it failed %d times: %s", items[0].event.event_id,
                      attempts, describe(failure))
            return [processing_failed(items[0], failure)]
        half = len(items) // 2  # each half once: a failure that recurs is in the record, not in luck
        return self._score_isolating(items[:half], 1) + self._score_isolating(items[half:], 1)

    def _wait(self, step: str, exc: Exception, attempt: int) -> None:
        """A dependency is down: back off and try again, unless the worker is stopping."""
        metrics.BATCH_RETRIES.labels(step=step).inc()
        log.warning("%s waits for a dependency (attempt %d): %s", step, attempt, describe(exc))
        if self.should_stop():
            raise Stopping(f"stopping while {step} waited: {describe(exc)}") from exc
        self.sleep(min(MAX_BACKOFF_S, 0.2 * 2**min(attempt, 5)))

    def _score_once(self, items: list[Item]) -> list[Outcome]:
        decisions = self._decide(items)
        received_ms = time.time() * 1000
        outcomes: list[Outcome] = []
        for item, decision in zip(items, decisions, strict=True):
            if isinstance(decision, Exception):
                outcomes.append(processing_failed(item, decision))
                continue
            try:
                latency_ms = received_ms - item.timestamp_ms if item.timestamp_ms > 0 else 0.0
                verdict = to_verdict(item.event, item.features, decision, self.bundle_id, latency_ms)
            except Exception as exc:  # e.g. a NaN signal failing Verdict validation: this record only
                log.warning("verdict for event %s failed: %s", item.event.event_id, describe(exc))
                outcomes.append(processing_failed(item, exc))
                continue
            outcomes.append(Scored(item, decision, verdict))
        return outcomes

    def _decide(self, items: list[Item]) -> list[Decision | Exception]:
        """Dedup first; only images with no earlier verdict reach kNN and the CNN."""
        features = [item.features for item in items]
        started = time.perf_counter()
        matches = self.lookups.dedup([(f.md5, variants(f, self.dihedral), f.pdq_quality, item.event.image_id)
                                      for f, item in zip(features, items, strict=True)])
        if len(matches) != len(items):
            raise ValueError(f"dedup answered {len(matches)} of {len(items)} queries")
        metrics.STAGE_LATENCY.labels(stage="dedup").observe(time.perf_counter() - started)
        for match in matches:
            if match is not None:
                metrics.DEDUP_LOOKUPS.labels(result=LOOKUP_RESULTS[match.kind]).inc()
        decisions: list[Decision | Exception | None] = [None] * len(items)
        unmatched = [i for i, match in enumerate(matches) if match is None]
        for i, match in enumerate(matches):
            if match is not None:
                decisions[i] = _per_record(decide_from_match, items[i].event, match)
        copies = batch_copies([features[i] for i in unmatched], self.pdq_max_distance, self.dihedral)
        leaders = [i for position, i in enumerate(unmatched) if position not in copies]
        for copy in copies.values():  # found inside this batch, before dedup state knew the original
            metrics.DEDUP_LOOKUPS.labels(result="exact" if copy.exact else "near").inc()
        metrics.DEDUP_LOOKUPS.labels(result="miss").inc(len(leaders))
        leaders = self._with_model_input(items, features, leaders, decisions)
        signals = self._model_signals([features[i] for i in leaders])
        started = time.perf_counter()
        for i, (knn, cnn) in zip(leaders, signals, strict=True):
            decisions[i] = _per_record(_decide_by_model, knn, cnn)
        if leaders:
            metrics.STAGE_LATENCY.labels(stage="fusion").observe(time.perf_counter() - started)
        for position, copy in copies.items():
            leader = unmatched[copy.leader]
            leader_decision = decisions[leader]
            if isinstance(leader_decision, Decision):
                decisions[unmatched[position]] = _per_record(
                    decide_as_copy, leader_decision, items[leader].event.image_id, copy.distance, copy.exact)
            else:  # the original failed, and its copy would get the same verdict
                decisions[unmatched[position]] = leader_decision
        return [decision if decision is not None else ValueError("no decision") for decision in decisions]

    def _with_model_input(self, items: list[Item], features: list[ImageFeatures], leaders: list[int],
                          decisions: list[Decision | Exception | None]) -> list[int]:
        """The leaders, each with its model input: one loaded from KnownFeatures (its original's
        verdict is gone from dedup state) is decoded again, and one that fails is its record's failure."""
        ready = []
        for i in leaders:
            if not has_model_input(features[i]):
                data = items[i].data
                try:
                    if data is None:
                        raise ValueError("features without a model input and no image to make it from")
                    features[i] = self.lookups.features_of(data)
                except Exception as exc:
                    decisions[i] = exc
                    continue
            ready.append(i)
        return ready

    def _model_signals(self, features: list[ImageFeatures]) -> list[tuple[float | None, ModelScore]]:
        if not features:
            return []
        knn_answer = self.lookups.knn([f.histogram for f in features])
        cnn = self.lookups.classify([f.cnn_input for f in features])
        knn = knn_answer()
        if len(knn) != len(features) or len(cnn) != len(features):
            raise ValueError(f"{len(features)} images got {len(knn)} kNN and {len(cnn)} CNN scores")
        return [(None if k is None else float(k), c) for k, c in zip(knn, cnn, strict=True)]


def _decide_by_model(knn: float | None, scored: ModelScore) -> Decision:
    """Fuse with the rules of the bundle that scored the image, and say whose they were."""
    decision = decide_from_model(knn, scored.cnn, FiniteFusion(scored.fusion), scored.thresholds)
    return replace(decision, model_version=scored.bundle_id,
                   signals={**decision.signals, "thresholds": scored.thresholds_source})


def _per_record(decide: Callable[..., Decision], *args: Any) -> Decision | Exception:
    """A decision, or the exception that made it fail (that record becomes a dead letter)."""
    try:
        return decide(*args)
    except Exception as exc:
        return exc
