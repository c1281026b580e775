"""The verdict sink: publish a scored batch, then settle it.

A batch moves through explicit states (``BatchState``): loaded by the source,
scored, published (verdicts and dead letters sent, dedup writes started) and
settled (the broker acknowledged every record and dedup logged every write).
Only a settled batch's offsets may be committed, so a crash at any earlier
point replays it.

Publishing never waits on a record forever. A record the broker refuses for
good (too large, invalid) is replaced: a verdict by a ``processing_failed``
dead letter, a dead letter by one without the original record; after that it
is logged and dropped. A broker that is unreachable is waited for instead,
since no record is to blame.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common import metrics
from common.messages import DeadLetter, Verdict, to_json_bytes
from workers.scorer import Item, Outcome, Scored, Stopping, Unavailable, describe, processing_failed

log = logging.getLogger(__name__)

WAIT_STEP_S = 0.5
MAX_BACKOFF_S = 5.0


class BatchState(enum.Enum):
    LOADED = "loaded"        # validated, fetched, decoded and hashed; dead letters of loading known
    SCORED = "scored"        # one outcome (verdict or dead letter) per record
    PUBLISHED = "published"  # every outcome sent, dedup writes started; nothing acknowledged yet
    SETTLED = "settled"      # acknowledged and remembered: its offsets may be committed


@dataclass
class Output:
    """One record to publish, and what became of it."""

    topic: str
    key: str
    value: bytes
    dead_letter: DeadLetter | None  # None: a verdict
    scored: Scored | None = None  # a verdict's item and verdict, for the dead letter that replaces it
    future: Any = None
    error: Exception | None = None  # raised by send() itself
    refusals: int = 0


@dataclass
class Batch:
    """Polled records on their way from the source to a commit."""

    items: list[Item]
    dead_letters: list[DeadLetter]  # records that failed to load
    positions: Any  # the source's commit positions for these records
    state: BatchState = BatchState.LOADED
    outcomes: list[Outcome] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    remembering: Any = None

    def scored(self, outcomes: list[Outcome]) -> None:
        assert self.state is BatchState.LOADED, self.state
        self.outcomes = outcomes + list(self.dead_letters)
        self.state = BatchState.SCORED

    @property
    def verdicts(self) -> list[Scored]:
        return [outcome for outcome in self.outcomes if isinstance(outcome, Scored)]

    @property
    def published_verdicts(self) -> list[Verdict]:
        return [output.scored.verdict for output in self.outputs if output.scored is not None]

    @property
    def published_dead_letters(self) -> list[DeadLetter]:
        return [output.dead_letter for output in self.outputs if output.dead_letter is not None]


def is_retriable(exc: BaseException) -> bool:
    """Kafka marks transient errors (timeouts, leader moves, broker down) ``retriable``."""
    return bool(getattr(exc, "retriable", False))


class VerdictSink:
    """Publishes outcomes and waits until they are durable."""

    def __init__(self, producer: Any, verdict_topic: str, dlq_topic: str,
                 remember: Callable[[list[Scored]], Any], wait_remembered: Callable[[Any], None],
                 attempts: int = 3, should_stop: Callable[[], bool] = lambda: False,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.producer = producer
        self.verdict_topic = verdict_topic
        self.dlq_topic = dlq_topic
        self.remember = remember
        self.wait_remembered = wait_remembered
        self.attempts = attempts
        self.should_stop = should_stop
        self.sleep = sleep

    def publish(self, batch: Batch) -> None:
        """Send every outcome and start the dedup writes, without waiting for either."""
        assert batch.state is BatchState.SCORED, batch.state
        batch.outputs = [self._output(outcome) for outcome in batch.outcomes]
        for output in batch.outputs:
            self._send(output)
        batch.remembering = self._start_remembering(batch.verdicts)
        batch.state = BatchState.PUBLISHED

    def settle(self, batch: Batch) -> None:
        """Wait for the broker and dedup; raises Stopping if asked to stop while they are down."""
        assert batch.state is BatchState.PUBLISHED, batch.state
        # Send now rather than after linger; kafka-python raises on timeout, and each record's outcome
        # is read below anyway.
        with contextlib.suppress(Exception):
            self.producer.flush(timeout=WAIT_STEP_S)
        for output in batch.outputs:
            self._acknowledged(output)
        self._remembered(batch)
        batch.state = BatchState.SETTLED

    # -- publishing ---------------------------------------------------------------------------------

    def _output(self, outcome: Outcome) -> Output:
        if isinstance(outcome, Scored):
            verdict = outcome.verdict
            return Output(self.verdict_topic, verdict.image_id, to_json_bytes(verdict), None, outcome)
        return Output(self.dlq_topic, outcome.event_id, to_json_bytes(outcome), outcome)

    def _send(self, output: Output) -> None:
        output.future, output.error = None, None
        try:
            output.future = self.producer.send(output.topic, key=output.key, value=output.value)
        except Exception as exc:  # refused before sending (too large for the client, buffer full)
            output.error = exc

    def _acknowledged(self, output: Output) -> None:
        """Wait until the broker has the record; resend what it lost, replace what it refused."""
        waits = 0
        while True:
            error = output.error or self._result(output)
            if error is None:
                return
            if is_retriable(error):
                waits += 1
                self._wait_for_broker(error, waits)
                self._send(output)
                continue
            self._replace_refused(output, error)
            if output.refusals > self.attempts:
                log.error("dropping a record for %s that the broker refused %d times: %s", output.key,
                          output.refusals, describe(error))
                metrics.BATCH_RETRIES.labels(step="publish_dropped").inc()
                return
            self._send(output)

    def _result(self, output: Output) -> Exception | None:
        """Block until the send completes; its exception, or None once acknowledged."""
        future = output.future
        while not future.is_done:
            with contextlib.suppress(Exception):  # the outcome is read below, once the future is done
                future.get(timeout=WAIT_STEP_S)
            if not future.is_done and self.should_stop():
                raise Stopping("stopping while the broker has not acknowledged a batch")
        return future.exception if future.failed() else None

    def _wait_for_broker(self, error: Exception, attempt: int) -> None:
        metrics.BATCH_RETRIES.labels(step="publish").inc()
        log.warning("the broker did not take a record (attempt %d), sending again: %s", attempt, describe(error))
        if self.should_stop():
            raise Stopping(f"stopping while the broker is unavailable: {describe(error)}") from error
        self.sleep(min(MAX_BACKOFF_S, 0.2 * 2**min(attempt, 5)))

    def _replace_refused(self, output: Output, error: Exception) -> None:
        """A verdict becomes a dead letter of its record; a dead letter loses its original record."""
        output.refusals += 1
        metrics.BATCH_RETRIES.labels(step="publish_refused").inc()
        log.warning("the broker refused a record for %s: %s", output.key, describe(error))
        if output.scored is not None:
            replacement = processing_failed(output.scored.item, error)
        else:
            previous = output.dead_letter
            assert previous is not None
            replacement = DeadLetter.for_record(previous.event_id, previous.reason,
                                                f"{previous.detail} (record dropped: {describe(error)})", None)
        output.topic, output.key, output.value = self.dlq_topic, replacement.event_id, to_json_bytes(replacement)
        output.dead_letter, output.scored = replacement, None

    # -- remembering --------------------------------------------------------------------------------

    def _start_remembering(self, scored: list[Scored]) -> Any:
        try:
            return self.remember(scored) if scored else None
        except Exception as exc:  # retried when the batch settles
            log.warning("remembering %d verdicts failed to start: %s", len(scored), describe(exc))
            return exc

    def _remembered(self, batch: Batch) -> None:
        """Dedup has logged the batch's verdicts; a failure that recurs skips the record that causes it."""
        scored = batch.verdicts
        if not scored:
            return
        handle = batch.remembering
        tries, waits = 0, 0
        while True:
            try:
                if isinstance(handle, Exception):
                    raise handle
                self.wait_remembered(handle)
                return
            except Unavailable as exc:
                waits += 1
                metrics.BATCH_RETRIES.labels(step="remember").inc()
                log.warning("dedup unavailable (attempt %d): %s", waits, describe(exc))
                if self.should_stop():
                    raise Stopping("stopping while dedup is unavailable") from exc
                self.sleep(min(MAX_BACKOFF_S, 0.2 * 2**min(waits, 5)))
            except Exception as exc:
                tries += 1
                metrics.BATCH_RETRIES.labels(step="remember").inc()
                log.warning("remembering %d verdicts failed (attempt %d): %s", len(scored), tries, describe(exc))
                if tries >= self.attempts:
                    self._remember_one_by_one(scored)
                    return
            handle = self._start_remembering(scored)

    def _remember_one_by_one(self, scored: list[Scored]) -> None:
        """The verdicts stand; a record whose dedup write keeps failing is only not remembered."""
        for one in scored:
            try:
                self.wait_remembered(self.remember([one]))
            except Exception as exc:
                log.error("event %s not remembered by dedup: %s", one.verdict.event_id, describe(exc))
