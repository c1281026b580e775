"""Ingest actors: one member each of the consumer group on the upload topic.

An actor wires three parts and runs them on two threads:

- the source (``workers.source``) owns the Kafka consumer on the poll thread:
  it polls a batch, loads every record (validate, fetch, decode, hash; see
  ``workers.scorer.load_record``) and queues it; the queue is bounded, which is
  the backpressure. It commits what the score thread settled, and hands
  partitions over on a rebalance only after committing them.
- the scorer (``workers.scorer``) decides each batch on the score thread:
  review sync, dedup lookup, kNN and CNN for the misses, fusion, verdicts.
- the sink (``workers.sink``) publishes verdicts and dead letters and writes
  dedup state, then settles the batch (broker acks, dedup writes) while the
  next one is scored; only a settled batch's offsets are committed, so a crash
  anywhere before replays it.

No record can stop a thread: whatever one record raises becomes its dead
letter. If a thread dies anyway, the actor exits so Ray restarts it, and
``stats`` (the health check) fails meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray
from ray import serve

from common import metrics  # by module: Ray pickles actor classes by value
from common.bundle import resolve_bundle
from common.config import Settings
from common.decisions import entry_for
from common.dedupstate import ImageRecord, quantise_histogram, shard_of
from common.errors import ModstreamError
from common.features import ImageFeatures
from common.fusion import FusionTree, Thresholds, applied_thresholds
from common.kafkaio import make_producer
from common.knownfeatures import KnownFeatures
from common.messages import DeadLetter
from common.threadcpu import cpu_by_thread
from workers.classifier import DEPLOYMENT_NAME
from workers.classifier import Scored as ClassifierAnswer
from workers.dedup import lookup_all
from workers.review import wait_until_caught_up
from workers.scorer import (
    Item,
    Lookups,
    ModelScore,
    Scored,
    Scorer,
    Stopping,
    Unavailable,
    describe,
    image_features,
    load_record,
)
from workers.sink import Batch, BatchState, VerdictSink
from workers.source import KafkaSource, SourceBatch, undecodable_dead_letter

log = logging.getLogger(__name__)

APP_NAME = "modstream"  # the default of settings.classifier.app_name
MODEL_ATTEMPTS = 6  # a killed classifier replica is replaced within a few seconds
POLL_TIMEOUT_MS = 100
BUSY_POLL_S = 1.0  # a poll running longer than this is working (e.g. finding a bad batch's end), not idle
REVIEW_SYNC_STEP_S = 0.05
REVIEW_LAGGING_CHECK_S = 0.1  # while reviews lag: a quick look per batch, no full wait
THREAD_DIED_EXIT_CODE = 70
MAX_POLL_FAILURES = 30  # in a row, about two minutes with the back-off
# Ray failures that say an actor or object is gone for now, not that the call was wrong.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError,
    ray.exceptions.ObjectLostError, ray.exceptions.WorkerCrashedError,
)


class ThreadDied(ModstreamError):
    """An ingest thread is dead; the actor is about to exit and be restarted."""


def _exit_process(name: str) -> None:
    """Exit without cleanup: a half-dead worker must not keep its partitions (Ray restarts the actor)."""
    logging.shutdown()
    os._exit(THREAD_DIED_EXIT_CODE)


class IngestWorker:
    """The body of an Ingest actor (a plain class, so it can run without Ray too)."""

    def __init__(self, settings: Settings, shards: list[Any], knn_replicas: list[Any], review: Any,
                 worker_index: int, on_thread_death: Callable[[str], None] = _exit_process) -> None:
        self.settings = settings
        self.shards = shards
        self.knn_replicas = knn_replicas
        self.review = review
        self.worker_index = worker_index
        self.on_thread_death = on_thread_death
        bundle = resolve_bundle(settings.bundle)
        self.bundle_id = bundle.id
        metrics.BUNDLE_INFO.labels(bundle_id=bundle.id).set(1)
        self.cnn_spec = bundle.cnn
        self._rules: dict[str, tuple[FusionTree, Thresholds, str]] = {}  # by bundle id, as replicas report them
        pipeline = settings.pipeline
        self.limits = settings.load_limits()
        self.draft = (pipeline.draft_size, pipeline.draft_size)
        self.known = KnownFeatures(pipeline.known_features)
        self.batches: queue.Queue[Batch | None] = queue.Queue(maxsize=pipeline.max_inflight_batches)
        self.stopping = threading.Event()
        self._outstanding = 0  # batches polled and not yet settled (queued, being scored or settling)
        self._outstanding_changed = threading.Condition()
        self.counts: Counter[str] = Counter()
        self.last_activity = time.monotonic()
        self._review_lagging = False  # the last wait for reviews ran out of time
        self._poll_failures = 0
        self._polling_since: float | None = None  # when the running poll began; None between polls
        self.producer = make_producer(settings)
        self.loaders = ThreadPoolExecutor(max_workers=4, thread_name_prefix="load")
        self.classifier = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=settings.classifier.app_name)
        size = bundle.cnn.input_size
        self.classifier.remote(np.zeros((1, size, size, 3), np.uint8)).result(timeout_s=300)  # warm the route
        self.scorer = Scorer(
            Lookups(dedup=self._lookup, knn=self._knn, classify=self._classify,
                    wait_for_reviews=self._wait_for_reviews, features_of=self._features_of),
            bundle.id, pipeline.pdq_max_distance, pipeline.pdq_dihedral, attempts=pipeline.batch_attempts,
            should_stop=self.stopping.is_set)
        self.sink = VerdictSink(self.producer, settings.topics.verdicts, settings.topics.dlq,
                                remember=self._remember, wait_remembered=self._wait_remembered,
                                attempts=pipeline.batch_attempts, should_stop=self.stopping.is_set)
        self.source: KafkaSource | None = None
        self._threads = [threading.Thread(target=self._supervised, args=(self._poll_loop,), name="poll",
                                          daemon=True),
                         threading.Thread(target=self._supervised, args=(self._score_loop,), name="score",
                                          daemon=True)]

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
        return self._counts()

    def stats(self) -> dict[str, Any]:
        """Counts and idleness; raises ThreadDied while a thread is dead (the health check fails)."""
        dead = [thread.name for thread in self._threads if not thread.is_alive()]
        if dead and not self.stopping.is_set():
            raise ThreadDied(f"ingest worker {self.worker_index}: thread {', '.join(dead)} died")
        return self._counts()

    def _counts(self) -> dict[str, Any]:
        polling_since = self._polling_since
        busy_polling = polling_since is not None and time.monotonic() - polling_since > BUSY_POLL_S
        # a partition that cannot be read, or a poll still at work on a bad batch, is not idle
        idle = self._outstanding == 0 and self._poll_failures == 0 and not busy_polling
        partitions = len(self.source.ledger.owned()) if self.source is not None else 0
        return {"worker": self.worker_index, "pid": os.getpid(), **self.counts, "idle": idle, "partitions": partitions,
                "inflight_batches": self.batches.qsize(), "idle_for_s": time.monotonic() - self.last_activity,
                "decodes_skipped": self.known.hits,
                "cpu_by_thread": cpu_by_thread()}

    def _supervised(self, loop: Callable[[], None]) -> None:
        """Run a thread's loop; if it ever raises, say so loudly and take the actor down."""
        name = threading.current_thread().name
        try:
            loop()
        except BaseException:
            log.critical("ingest thread %s died; exiting so that the actor restarts", name, exc_info=True)
            self.on_thread_death(name)
            raise

    # -- poll thread -------------------------------------------------------------------------------

    def _poll_loop(self) -> None:
        self.source = source = KafkaSource(self.settings, self._drained)
        self.last_activity = time.monotonic()  # idleness counts from joining, not from loading the model
        try:
            while not self.stopping.is_set():
                source.commit()
                source.report_lag()
                polled = self._poll(source)
                if polled is None or polled.empty:
                    continue
                self.last_activity = time.monotonic()
                self._count_outstanding(+1)
                if not self._enqueue(self._prepare(polled), source):
                    self._count_outstanding(-1)
                    break  # stopping: this batch was not scored, so its offsets stay uncommitted
            self.drain()
            source.commit()
        finally:
            self.batches.put(None)
            source.close()

    def _enqueue(self, batch: Batch, source: KafkaSource) -> bool:
        """Queue a polled batch for scoring, committing while the queue is full. False only when
        stopping finds it full: a batch polled when the stop came is still scored if there is room
        (the drain finishes what was polled; before, SIGTERM during its decode dropped it)."""
        while True:
            try:
                self.batches.put(batch, timeout=0.1)
                return True
            except queue.Full:
                if self.stopping.is_set():
                    return False
                source.commit()

    def _poll(self, source: KafkaSource) -> SourceBatch | None:
        """One poll; a failing poll is retried with a back-off (not idle meanwhile), and only one that
        keeps failing for minutes takes the thread down, so the actor restarts with a new consumer."""
        self._polling_since = time.monotonic()
        try:
            polled = source.poll(POLL_TIMEOUT_MS, self.settings.pipeline.poll_records)
        except Exception as exc:
            self._poll_failures += 1
            if self._poll_failures >= MAX_POLL_FAILURES:
                raise
            log.warning("poll failed (%d in a row): %s", self._poll_failures, describe(exc))
            self.stopping.wait(min(5.0, 0.1 * 2**self._poll_failures))
            return None
        finally:
            self._polling_since = None
        self._poll_failures = 0
        return polled

    def _count_outstanding(self, change: int) -> None:
        with self._outstanding_changed:
            self._outstanding += change
            metrics.INFLIGHT_BATCHES.inc(change)
            self._outstanding_changed.notify_all()

    def _drained(self) -> bool:
        return self._outstanding == 0 or not self._threads[1].is_alive()

    def drain(self) -> None:
        """Wait until every polled batch is settled (called on the poll thread)."""
        with self._outstanding_changed:
            while not self._drained():
                self._outstanding_changed.wait(0.1)

    def _prepare(self, polled: SourceBatch) -> Batch:
        """Load every record; bad ones become dead letters, never exceptions."""
        records = polled.records
        self.counts["events_consumed"] += len(records)
        metrics.EVENTS_CONSUMED.labels(topic=self.settings.topics.uploads).inc(len(records))
        items: list[Item] = []
        dead_letters = [undecodable_dead_letter(skipped) for skipped in polled.undecodable]
        model_input = self.cnn_spec.model_input
        for outcome in self.loaders.map(
                lambda record: load_record(record, self.limits, self.draft, model_input, self.known), records):
            if isinstance(outcome, DeadLetter):
                dead_letters.append(outcome)
            else:
                items.append(outcome)
        return Batch(items, dead_letters, polled.positions)

    # -- score thread ------------------------------------------------------------------------------

    def _score_loop(self) -> None:
        """Score batches in order; settle each (durable, then committable) while the next is scored.

        Every batch already queued when the thread turns to scoring is scored
        with the first, in one pass (one review sync, one dedup call per shard,
        one kNN query, full model batches): under a backlog the passes grow
        and the per-call costs shrink per image, and at low load a batch never
        waits behind the ones queued before it.

        A batch's verdicts are sent and its dedup entries written without
        waiting; the next pass's lookups still see them, because Ray runs one
        caller's calls to an actor in order. Its offsets are committed only
        once the broker acknowledged every record and every shard logged its
        entries.
        """
        unsettled: deque[Batch] = deque()
        passes: list[Batch] = []
        try:
            while True:
                try:
                    batch = self.batches.get(timeout=0.05) if unsettled else self.batches.get()
                except queue.Empty:  # nothing new: settle what is in flight
                    while unsettled:
                        self._settle(unsettled.popleft())
                    continue
                passes, last = self._with_queued(batch)
                if passes:
                    self._score_together(passes)
                    unsettled.extend(passes)
                    while len(unsettled) > len(passes):
                        self._settle(unsettled.popleft())
                if last:
                    while unsettled:
                        self._settle(unsettled.popleft())
                    return
        except Stopping as exc:  # not committed: the next owner of these partitions replays them
            log.warning("stopping with %d batches unsettled: %s", len(unsettled) + len(passes), exc)

    def _with_queued(self, first: Batch | None) -> tuple[list[Batch], bool]:
        """``first`` and every batch queued behind it; True when the poll thread has finished."""
        taken: list[Batch] = []
        batch = first
        while batch is not None:
            taken.append(batch)
            try:
                batch = self.batches.get_nowait()
            except queue.Empty:
                return taken, False
        return taken, True

    def _score_together(self, batches: list[Batch]) -> None:
        """Score several batches in one pass, then publish each (in poll order)."""
        outcomes = self.scorer.score([item for batch in batches for item in batch.items])
        start = 0
        for batch in batches:
            batch.scored(outcomes[start:start + len(batch.items)])
            start += len(batch.items)
            self.sink.publish(batch)

    def _settle(self, batch: Batch) -> None:
        self.sink.settle(batch)
        self._hand_over(batch)

    def _hand_over(self, batch: Batch) -> None:
        """The batch is durable: count it and let the source commit its offsets."""
        assert batch.state is BatchState.SETTLED, batch.state
        verdicts = batch.published_verdicts
        dead_letters = batch.published_dead_letters
        for verdict in verdicts:
            self.counts[f"verdicts_{verdict.action}"] += 1
            self.counts[f"source_{verdict.source}"] += 1
            metrics.VERDICTS.labels(action=verdict.action, source=verdict.source).inc()
            metrics.STAGE_LATENCY.labels(stage="end_to_end").observe(verdict.latency_ms / 1000)
        for dead in dead_letters:
            self.counts[f"dead_{dead.reason}"] += 1
            metrics.DEAD_LETTERS.labels(reason=dead.reason).inc()
        self.counts["verdicts"] += len(verdicts)
        self.counts["dead_letters"] += len(dead_letters)
        if self.source is not None:
            self.source.settle(batch.positions)
        self.last_activity = time.monotonic()
        self._count_outstanding(-1)

    # -- what the scorer and the sink call ----------------------------------------------------------

    def _wait_for_reviews(self, until_ms: int) -> bool:
        """Let ReviewFeedback apply every review published up to ``until_ms`` (bounded wait).

        Once the bound ran out, later batches only check briefly until the review
        consumer is caught up again: a review actor that is down costs the stream
        one timeout, not one per batch."""
        timeout_s = REVIEW_LAGGING_CHECK_S if self._review_lagging else self.settings.pipeline.review_sync_timeout_s
        if wait_until_caught_up(self.review, until_ms, timeout_s, REVIEW_SYNC_STEP_S):
            if self._review_lagging:
                log.info("review feedback caught up again; waiting for reviews before scoring")
            self._review_lagging = False
            return True
        if not self._review_lagging:
            log.warning("review feedback not caught up with %d after %.1f s; scoring without waiting until "
                        "it is", until_ms, timeout_s)
        self._review_lagging = True
        metrics.REVIEW_SYNC_TIMEOUTS.inc()
        return False

    def _features_of(self, data: bytes) -> ImageFeatures:
        return image_features(data, self.limits, self.draft, self.cnn_spec.model_input)

    def _lookup(self, queries: list) -> list:
        with _unavailable_on_ray_failure("dedup lookup"):
            return lookup_all(self.shards, queries)

    def _knn(self, histograms: list[np.ndarray]) -> Callable[[], list[float | None]]:
        replica = self.knn_replicas[self.counts["knn_calls"] % len(self.knn_replicas)]
        self.counts["knn_calls"] += 1
        ref = replica.probabilities.remote(np.stack(histograms))

        def answer() -> list[float | None]:
            with _unavailable_on_ray_failure("knn"):
                return list(ray.get(ref))
        return answer

    def _rules_of(self, answer: ClassifierAnswer) -> tuple[FusionTree, Thresholds, str]:
        """The fusion tree and thresholds of the bundle that scored; settings override thresholds when set."""
        if answer.bundle_id not in self._rules:
            overrides = self.settings.thresholds
            thresholds, source = applied_thresholds(answer.thresholds, overrides.block, overrides.review)
            self._rules[answer.bundle_id] = (FusionTree.from_dict(answer.fusion), thresholds, source)
        return self._rules[answer.bundle_id]

    def _classify(self, images: list[np.ndarray]) -> list[ModelScore]:
        """P(adult) per image with the rules (bundle id, fusion, thresholds) of the replica that scored it.

        One Serve request per chunk of at most a model batch; failed chunks are asked again."""
        size = self.settings.classifier.max_batch_size
        chunks = {start: np.stack(images[start:start + size]) for start in range(0, len(images), size)}
        scores: dict[int, ClassifierAnswer] = {}
        for attempt in range(MODEL_ATTEMPTS):
            responses = {start: self.classifier.remote(chunk) for start, chunk in chunks.items()
                         if start not in scores}
            for start, response in responses.items():
                try:
                    scores[start] = response.result(timeout_s=120)
                except Exception:  # replica died or timed out: ask again
                    metrics.CLASSIFIER_ERRORS.inc()
            if len(scores) == len(chunks):
                return [self._model_score(score, scores[start]) for start in sorted(scores)
                        for score in scores[start].scores]
            log.warning("classifier failed for %d chunks (attempt %d); retrying", len(chunks) - len(scores),
                        attempt + 1)
            if self.stopping.wait(min(5.0, 0.5 * 2**attempt)):
                break
        raise Unavailable(f"classifier failed for {len(chunks) - len(scores)} chunks after {MODEL_ATTEMPTS} "
                          "attempts")

    def _model_score(self, cnn: float, answer: ClassifierAnswer) -> ModelScore:
        fusion, thresholds, source = self._rules_of(answer)
        return ModelScore(cnn, answer.bundle_id, fusion, thresholds, source)

    def _remember(self, scored: list[Scored]) -> list:
        """Model verdicts under their hashes, every image under its id; the calls' refs to wait on."""
        shards = len(self.shards)
        entries: list[list] = [[] for _ in range(shards)]
        images: list[list] = [[] for _ in range(shards)]
        for one in scored:
            item, decision = one.item, one.decision
            f = item.features
            if decision.source == "model" and decision.matched_image_id is None:
                entries[shard_of(f.md5, shards)].append(
                    entry_for(item.event, f, decision, decision.model_version or self.bundle_id))
            images[shard_of(item.event.image_id, shards)].append(ImageRecord(
                image_id=item.event.image_id, md5=f.md5, pdq=f.pdq, pdq_quality=f.pdq_quality,
                histogram=quantise_histogram(f.histogram)))
        return [shard.remember_many.remote(entries[i], images[i])
                for i, shard in enumerate(self.shards) if entries[i] or images[i]]

    @staticmethod
    def _wait_remembered(refs: list) -> None:
        with _unavailable_on_ray_failure("dedup remember"):
            ray.get(refs)


@contextlib.contextmanager
def _unavailable_on_ray_failure(what: str) -> Iterator[None]:
    """Turn "an actor is gone for now" into Unavailable, so the batch waits instead of blaming records."""
    try:
        yield
    except UNAVAILABLE_ERRORS as exc:
        raise Unavailable(f"{what}: {describe(exc)}") from exc


@ray.remote(max_restarts=-1, max_task_retries=0)
class Ingest:
    """Ray actor around IngestWorker; Ray restarts it if it dies and it rejoins the group."""

    def __init__(self, settings: Settings, shards: list[Any], knn_replicas: list[Any], review: Any,
                 worker_index: int) -> None:
        logging.basicConfig(level=logging.INFO)
        self.worker = IngestWorker(settings, shards, knn_replicas, review, worker_index)
        self.worker.start()

    def stats(self) -> dict[str, Any]:
        return self.worker.stats()

    def stop(self) -> dict[str, Any]:
        return self.worker.stop()
