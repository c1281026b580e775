"""Ingest actors: one member each of the consumer group on the upload topic.

Two threads per actor. The poll thread owns the Kafka consumer (it is not
thread-safe): it polls a batch, validates, fetches, decodes and hashes it, and
queues it; the queue is bounded, which is the backpressure. The score thread
takes batches in order: dedup lookup, kNN and CNN for the misses, fusion,
verdicts and dead letters produced and acknowledged, verdicts remembered in
dedup state, and only then the batch's offsets handed back to the poll thread
to commit. A crash anywhere before that commit replays the batch.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import ray
from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.structs import OffsetAndMetadata
from ray import serve

from common import metrics  # by module: Ray pickles actor classes by value
from common.bundle import resolve_bundle
from common.config import Settings
from common.decisions import (
    Decision,
    batch_copies,
    decide_as_copy,
    decide_from_match,
    decide_from_model,
    entry_for,
    to_verdict,
    variants,
)
from common.decode import decode_image
from common.dedupstate import ImageRecord, quantise_histogram, shard_of
from common.features import ImageFeatures, extract_features
from common.fetch import fetch_bytes
from common.fusion import FusionTree, Thresholds, applied_thresholds
from common.kafkaio import make_consumer, make_producer
from common.loaderrors import LoadError
from common.messages import (
    DeadLetter,
    MessageError,
    UploadEvent,
    Verdict,
    parse_upload_event,
    peek_event_id,
    record_placeholder_id,
    to_json_bytes,
)
from workers.classifier import DEPLOYMENT_NAME, Scored
from workers.dedup import lookup_all

log = logging.getLogger(__name__)

APP_NAME = "modstream"
MODEL_ATTEMPTS = 6  # a killed classifier replica is replaced within a few seconds
LAG_INTERVAL_S = 5.0
LOOKUP_RESULTS = {"exact": "exact", "near": "near", "image_review": "review", "bank": "bank"}


@dataclass
class Item:
    """An accepted event with its features, waiting for a verdict."""

    event: UploadEvent
    features: ImageFeatures
    timestamp_ms: int


@dataclass
class Batch:
    items: list[Item] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)  # next offset to commit
    # Progress, so a retried batch resumes instead of deciding or publishing twice.
    decisions: list[Decision] | None = None
    verdicts: list[Verdict] | None = None
    sent: list = field(default_factory=list)  # producer futures of verdicts and dead letters
    remembering: list = field(default_factory=list)  # ObjectRefs of the dedup shards' remember calls


class _DrainOnRevoke(ConsumerRebalanceListener):
    """Finish and commit in-flight batches before giving partitions away."""

    def __init__(self, worker: IngestWorker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.worker.drain()
        for tp in revoked:  # the next owner reports these; a stale value here would linger
            metrics.CONSUMER_LAG.labels(topic=tp.topic, partition=str(tp.partition)).set(0)

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("assigned %s", sorted((tp.topic, tp.partition) for tp in assigned))


class IngestWorker:
    """The body of an Ingest actor (a plain class, so it can run without Ray too)."""

    def __init__(self, settings: Settings, shards: list[Any], knn_replicas: list[Any], worker_index: int) -> None:
        self.settings = settings
        self.shards = shards
        self.knn_replicas = knn_replicas
        self.worker_index = worker_index
        bundle = resolve_bundle(settings.bundle)
        self.bundle_id = bundle.id
        metrics.BUNDLE_INFO.labels(bundle_id=bundle.id).set(1)
        self.cnn_spec = bundle.cnn
        self._rules: dict[str, tuple[FusionTree, Thresholds, str]] = {}  # by bundle id, as replicas report them
        self.limits = settings.load_limits()
        self.draft = (settings.pipeline.draft_size, settings.pipeline.draft_size)
        self.batches: queue.Queue[Batch | None] = queue.Queue(maxsize=settings.pipeline.max_inflight_batches)
        self.to_commit: queue.Queue[dict[TopicPartition, int]] = queue.Queue()
        self.stopping = threading.Event()
        self._outstanding = 0  # batches polled and not yet scored (queued, or being scored)
        self._outstanding_changed = threading.Condition()
        self.counts: Counter[str] = Counter()
        self.last_activity = time.monotonic()
        self.producer = make_producer(settings)
        self.loaders = ThreadPoolExecutor(max_workers=4, thread_name_prefix="load")
        self.classifier = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=settings.classifier.app_name)
        size = bundle.cnn.input_size
        self.classifier.remote(np.zeros((1, size, size, 3), np.uint8)).result(timeout_s=300)  # warm the route
        self._threads = [threading.Thread(target=self._poll_loop, name="poll", daemon=True),
                         threading.Thread(target=self._score_loop, name="score", daemon=True)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Finish what was polled, commit it and leave the group."""
        self.stopping.set()
        for thread in self._threads:
            thread.join(timeout=timeout_s)
        self.producer.close()
        self.loaders.shutdown()
        return self.stats()

    def stats(self) -> dict[str, Any]:
        return {"worker": self.worker_index, **self.counts, "idle": self._outstanding == 0,
                "inflight_batches": self.batches.qsize(), "idle_for_s": time.monotonic() - self.last_activity}

    # -- poll thread -------------------------------------------------------------------------------

    def _poll_loop(self) -> None:
        consumer = make_consumer(self.settings, topics=None, group_id=self.settings.kafka.group_id)
        consumer.subscribe([self.settings.topics.uploads], listener=_DrainOnRevoke(self))
        next_lag_report = 0.0
        try:
            while not self.stopping.is_set():
                self._commit_ready(consumer)
                if time.monotonic() >= next_lag_report:
                    report_lag(consumer)
                    next_lag_report = time.monotonic() + LAG_INTERVAL_S
                polled = consumer.poll(timeout_ms=100, max_records=self.settings.pipeline.poll_records)
                records = [record for batch in polled.values() for record in batch]
                if not records:
                    continue
                self.last_activity = time.monotonic()
                self._count_outstanding(+1)
                batch = self._prepare(records)
                while not self.stopping.is_set():
                    try:
                        self.batches.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        self._commit_ready(consumer)
                else:
                    self._count_outstanding(-1)
                    break  # stopping: this batch was not scored, so its offsets stay uncommitted
            self.drain()
            self._commit_ready(consumer)
        finally:
            self.batches.put(None)
            consumer.close(autocommit=False)

    def _count_outstanding(self, change: int) -> None:
        with self._outstanding_changed:
            self._outstanding += change
            metrics.INFLIGHT_BATCHES.inc(change)
            self._outstanding_changed.notify_all()

    def drain(self) -> None:
        """Wait until every polled batch is scored (called on the poll thread)."""
        with self._outstanding_changed:
            while self._outstanding and self._threads[1].is_alive():
                self._outstanding_changed.wait(0.1)

    def _commit_ready(self, consumer) -> None:
        offsets: dict[TopicPartition, int] = {}
        while True:
            try:
                offsets.update(self.to_commit.get_nowait())
            except queue.Empty:
                break
        if offsets:
            consumer.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()})

    def _prepare(self, records: list) -> Batch:
        """Validate and load every record; bad ones become dead letters, never exceptions."""
        batch = Batch()
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            batch.offsets[tp] = max(batch.offsets.get(tp, 0), record.offset + 1)
        self.counts["events_consumed"] += len(records)
        metrics.EVENTS_CONSUMED.labels(topic=self.settings.topics.uploads).inc(len(records))
        for record, outcome in zip(records, self.loaders.map(self._load, records), strict=True):
            if isinstance(outcome, DeadLetter):
                batch.dead_letters.append(outcome)
            else:
                batch.items.append(Item(outcome[0], outcome[1], record.timestamp))
        return batch

    def _load(self, record) -> tuple[UploadEvent, ImageFeatures] | DeadLetter:
        try:
            event = parse_upload_event(record.value if record.value is not None else b"")
        except MessageError as exc:
            event_id = peek_event_id(record.value) or record_placeholder_id(
                record.topic, record.partition, record.offset)
            return DeadLetter.for_record(event_id, "invalid_event", str(exc), record.value)
        try:
            started = time.perf_counter()
            data = event.inline_bytes()
            if data is None:
                data = fetch_bytes(event.uri, self.limits)
                metrics.STAGE_LATENCY.labels(stage="fetch").observe(time.perf_counter() - started)
            started = time.perf_counter()
            image = decode_image(data, self.limits, draft_to=self.draft)
            decoded = time.perf_counter()
            features = extract_features(data, image, image.size)
            features = replace(features, cnn_input=_read_only(self.cnn_spec.model_input(image)))
            metrics.STAGE_LATENCY.labels(stage="decode").observe(decoded - started)
            metrics.STAGE_LATENCY.labels(stage="hash").observe(time.perf_counter() - decoded)
            return event, features
        except LoadError as exc:
            return DeadLetter.for_record(event.event_id, exc.reason, exc.detail, without_inline_bytes(record.value))

    # -- score thread ------------------------------------------------------------------------------

    def _score_loop(self) -> None:
        """Score batches in order; settle each (durable, then committable) while the next is scored.

        A batch's verdicts are sent and its dedup entries written without
        waiting; the next batch's lookups still see them, because Ray runs one
        caller's calls to an actor in order. Its offsets go to the commit queue
        only once the broker acknowledged every record and every shard logged
        its entries, so a crash at any point replays it.
        """
        unsettled: deque[Batch] = deque()
        while True:
            try:
                batch = self.batches.get(timeout=0.05) if unsettled else self.batches.get()
            except queue.Empty:
                batch = False  # nothing new: settle what is in flight
            if batch is None:
                while unsettled and self._with_retries(self._settle, unsettled[0]):
                    self._hand_over(unsettled.popleft())
                return
            if batch is not False:
                if not self._with_retries(self._score, batch):
                    return  # stopping: not committed, the next owner of these partitions replays it
                unsettled.append(batch)
            while unsettled and (batch is False or len(unsettled) > 1):
                if not self._with_retries(self._settle, unsettled[0]):
                    return
                self._hand_over(unsettled.popleft())

    def _with_retries(self, step: Callable[[Batch], None], batch: Batch) -> bool:
        """Run a step until it succeeds; an actor or the broker failing is retried, never dropped."""
        attempt = 0
        while True:
            try:
                step(batch)
                return True
            except Exception:
                attempt += 1
                log.exception("%s failed for a batch (attempt %d); retrying", step.__name__, attempt)
                if self.stopping.is_set() and attempt >= 3:
                    return False
                time.sleep(min(5.0, 0.2 * 2**attempt))

    def _hand_over(self, batch: Batch) -> None:
        """The batch is durable: count it and let the poll thread commit its offsets."""
        for verdict in batch.verdicts:
            self.counts[f"verdicts_{verdict.action}"] += 1
            self.counts[f"source_{verdict.source}"] += 1
            metrics.VERDICTS.labels(action=verdict.action, source=verdict.source).inc()
            metrics.STAGE_LATENCY.labels(stage="end_to_end").observe(verdict.latency_ms / 1000)
        for dead in batch.dead_letters:
            self.counts[f"dead_{dead.reason}"] += 1
            metrics.DEAD_LETTERS.labels(reason=dead.reason).inc()
        self.counts["verdicts"] += len(batch.verdicts)
        self.counts["dead_letters"] += len(batch.dead_letters)
        self.to_commit.put(batch.offsets)
        self.last_activity = time.monotonic()
        self._count_outstanding(-1)

    def _score(self, batch: Batch) -> None:
        """Decide, send, remember, without waiting; a retry skips what is done."""
        items = batch.items
        if batch.verdicts is None:
            decisions = self._decide(items)
            received_ms = time.time() * 1000
            batch.verdicts = [to_verdict(item.event, item.features, decision, self.bundle_id,
                                         received_ms - item.timestamp_ms if item.timestamp_ms > 0 else 0.0)
                              for item, decision in zip(items, decisions, strict=True)]
            batch.decisions = decisions
        if not batch.sent:
            topics = self.settings.topics
            batch.sent = [self.producer.send(topics.verdicts, key=v.image_id, value=to_json_bytes(v))
                          for v in batch.verdicts]
            batch.sent += [self.producer.send(topics.dlq, key=d.event_id, value=to_json_bytes(d))
                           for d in batch.dead_letters]
        if not batch.remembering:
            batch.remembering = self._remember(items, batch.decisions)

    def _settle(self, batch: Batch) -> None:
        """Wait for the broker and the shards; after a failure the next attempt sends again."""
        self._score(batch)  # redoes any step a failed attempt undid
        try:
            self.producer.flush()
            for future in batch.sent:
                future.get(timeout=30)
            ray.get(batch.remembering)
        except Exception:
            batch.sent, batch.remembering = [], []
            raise

    def _decide(self, items: list[Item]) -> list[Decision]:
        """Dedup first; only images with no earlier verdict reach kNN and the CNN."""
        features = [item.features for item in items]
        started = time.perf_counter()
        dihedral = self.settings.pipeline.pdq_dihedral
        matches = lookup_all(self.shards, [(f.md5, variants(f, dihedral), f.pdq_quality, item.event.image_id)
                                           for f, item in zip(features, items, strict=True)])
        metrics.STAGE_LATENCY.labels(stage="dedup").observe(time.perf_counter() - started)
        for match in matches:
            if match is not None:
                metrics.DEDUP_LOOKUPS.labels(result=LOOKUP_RESULTS[match.kind]).inc()
        decisions: list[Decision | None] = [None] * len(items)
        unmatched = [i for i, match in enumerate(matches) if match is None]
        for i, match in enumerate(matches):
            if match is not None:
                decisions[i] = decide_from_match(items[i].event, match)
        copies = batch_copies([features[i] for i in unmatched], self.settings.pipeline.pdq_max_distance, dihedral)
        leaders = [i for position, i in enumerate(unmatched) if position not in copies]
        for copy in copies.values():  # found inside this batch, before dedup state knew the original
            metrics.DEDUP_LOOKUPS.labels(result="exact" if copy.exact else "near").inc()
        metrics.DEDUP_LOOKUPS.labels(result="miss").inc(len(leaders))
        signals = self._model_signals([features[i] for i in leaders])
        started = time.perf_counter()
        for i, (knn, cnn, scored_by) in zip(leaders, signals, strict=True):
            fusion, thresholds, source = self._rules_of(scored_by)
            decision = decide_from_model(knn, cnn, fusion, thresholds)
            decisions[i] = replace(decision, model_version=scored_by.bundle_id,
                                   signals={**decision.signals, "thresholds": source})
        if leaders:
            metrics.STAGE_LATENCY.labels(stage="fusion").observe(time.perf_counter() - started)
        for position, copy in copies.items():
            leader = unmatched[copy.leader]
            decisions[unmatched[position]] = decide_as_copy(
                decisions[leader], items[leader].event.image_id, copy.distance, copy.exact)
        return decisions

    def _rules_of(self, scored: Scored) -> tuple[FusionTree, Thresholds, str]:
        """The fusion tree and thresholds of the bundle that scored; settings override thresholds when set."""
        if scored.bundle_id not in self._rules:
            overrides = self.settings.thresholds
            thresholds, source = applied_thresholds(scored.thresholds, overrides.block, overrides.review)
            self._rules[scored.bundle_id] = (FusionTree.from_dict(scored.fusion), thresholds, source)
        return self._rules[scored.bundle_id]

    def _model_signals(self, features: list[ImageFeatures]) -> list[tuple[float | None, float, Scored]]:
        if not features:
            return []
        replica = self.knn_replicas[self.counts["knn_calls"] % len(self.knn_replicas)]
        self.counts["knn_calls"] += 1
        knn_ref = replica.probabilities.remote(np.stack([f.histogram for f in features]))
        cnn = self._classify([f.cnn_input for f in features])
        knn = ray.get(knn_ref)
        return [(None if k is None else float(k), c, by) for k, (c, by) in zip(knn, cnn, strict=True)]

    def _classify(self, images: list[np.ndarray]) -> list[tuple[float, Scored]]:
        """P(adult) per image with the answer (bundle id, fusion, thresholds) of the replica that scored it.

        One Serve request per chunk of at most a model batch; failed chunks are asked again."""
        size = self.settings.classifier.max_batch_size
        chunks = {start: np.stack(images[start:start + size]) for start in range(0, len(images), size)}
        scores: dict[int, Scored] = {}
        for attempt in range(MODEL_ATTEMPTS):
            responses = {start: self.classifier.remote(chunk) for start, chunk in chunks.items()
                         if start not in scores}
            for start, response in responses.items():
                try:
                    scores[start] = response.result(timeout_s=120)
                except Exception:  # replica died or timed out: ask again
                    metrics.CLASSIFIER_ERRORS.inc()
            if len(scores) == len(chunks):
                return [(score, scores[start]) for start in sorted(scores) for score in scores[start].scores]
            log.warning("classifier failed for %d chunks (attempt %d); retrying", len(chunks) - len(scores),
                        attempt + 1)
            time.sleep(min(5.0, 0.5 * 2**attempt))
        raise RuntimeError(f"classifier failed for {len(chunks) - len(scores)} chunks after {MODEL_ATTEMPTS} attempts")

    def _remember(self, items: list[Item], decisions: list[Decision]) -> list:
        """Model verdicts under their hashes, every image under its id; the calls' refs to wait on."""
        shards = len(self.shards)
        entries: list[list] = [[] for _ in range(shards)]
        images: list[list] = [[] for _ in range(shards)]
        for item, decision in zip(items, decisions, strict=True):
            f = item.features
            if decision.source == "model" and decision.matched_image_id is None:
                entries[shard_of(f.md5, shards)].append(
                    entry_for(item.event, f, decision, decision.model_version or self.bundle_id))
            images[shard_of(item.event.image_id, shards)].append(ImageRecord(
                image_id=item.event.image_id, md5=f.md5, pdq=f.pdq, pdq_quality=f.pdq_quality,
                histogram=quantise_histogram(f.histogram)))
        return [shard.remember_many.remote(entries[i], images[i])
                for i, shard in enumerate(self.shards) if entries[i] or images[i]]


@ray.remote(max_restarts=-1, max_task_retries=0)
class Ingest:
    """Ray actor around IngestWorker; Ray restarts it if it dies and it rejoins the group."""

    def __init__(self, settings: Settings, shards: list[Any], knn_replicas: list[Any], worker_index: int) -> None:
        logging.basicConfig(level=logging.INFO)
        self.worker = IngestWorker(settings, shards, knn_replicas,
                                   worker_index)
        self.worker.start()

    def stats(self) -> dict[str, Any]:
        return self.worker.stats()

    def stop(self) -> dict[str, Any]:
        return self.worker.stop()


def report_lag(consumer) -> None:
    """Lag per assigned partition: end offset minus committed offset.

    The embedded broker can report end offsets wrongly (FACTS.md); a negative
    difference is such a report and is shown as 0 rather than trusted.
    """
    assigned = list(consumer.assignment())
    if not assigned:
        return
    try:
        ends = consumer.end_offsets(assigned)
    except Exception:  # lag is advisory: never let it stop ingest
        log.debug("end offsets unavailable", exc_info=True)
        return
    for tp in assigned:
        committed = consumer.committed(tp) or 0
        lag = max(0, ends.get(tp, 0) - committed)
        metrics.CONSUMER_LAG.labels(topic=tp.topic, partition=str(tp.partition)).set(lag)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


DLQ_INLINE_LIMIT = 64 * 1024


def without_inline_bytes(raw: bytes) -> bytes:
    """The record for a dead letter, minus a large inline image.

    The bytes that failed are what made the record large; copying them would
    make the dead letter larger than the broker may accept and stall the batch.
    The original record stays on the upload topic at its offset.
    """
    if len(raw) <= DLQ_INLINE_LIMIT:
        return raw
    try:
        event = json.loads(raw)
    except ValueError:
        return raw
    if not isinstance(event, dict) or not isinstance(event.get("data_b64"), str):
        return raw
    event["data_b64_elided_bytes"] = len(event.pop("data_b64"))
    return json.dumps(event).encode()
