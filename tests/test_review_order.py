"""Reviews against uploads: a review already in the topic applies to every copy scored after it,
the review consumer commits only what it applied, and verdicts read back in time order."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from kafka import KafkaProducer, TopicPartition

from common.dedupstate import REVIEW_ACTIONS
from common.kafkaio import ensure_topics, make_consumer, read_from_beginning
from common.logend import log_end
from common.messages import Hashes, ReviewDecision, Signals, Verdict
from deploy.cli import main
from deploy.clients import (
    TimedVerdict,
    parse_since,
    publish_events,
    publish_review,
    read_verdicts,
    time_ordered,
    upload_event_for,
)
from tests.conftest import wait_for
from workers.reissue import RecentVerdicts, reissue_event_id
from workers.review import ReviewApplier, ReviewFeedback, ReviewProgress

SAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "samples"


# -- the review consumer's bookkeeping (pure logic) -------------------------------------------------

def test_only_applied_positions_are_committed() -> None:
    progress = ReviewProgress()
    assert progress.start(0, committed=5) == 5
    progress.fetched(0, [(5, 100), (6, 101), (7, 102)], position=8, highwater=8)
    assert progress.to_commit() == {}  # fetched is not applied
    progress.applied(0, 5)
    assert progress.to_commit() == {0: 6}
    progress.committed({0: 6})
    assert progress.to_commit() == {}
    # Stopping now leaves 6 and 7 unapplied: nothing more to commit, whatever the consumer's position.
    progress.applied(0, 6)
    progress.applied(0, 7)
    assert progress.to_commit() == {0: 8}


def test_a_new_consumer_resumes_where_the_last_one_stopped_applying() -> None:
    progress = ReviewProgress()
    progress.start(0, committed=0)
    progress.fetched(0, [(0, 1), (1, 2)], position=2, highwater=2)
    progress.applied(0, 0)
    # The broker failed before the commit: the reconnected consumer starts after what was applied,
    # not at the older commit, and still owes that commit.
    assert progress.start(0, committed=0) == 1
    assert progress.to_commit() == {0: 1}


def test_positions_skipped_without_records_count_as_applied() -> None:
    progress = ReviewProgress()
    progress.start(0, committed=3)
    progress.fetched(0, [], position=5, highwater=5)  # e.g. transaction markers at 3 and 4
    assert progress.to_commit() == {0: 5}
    assert progress.caught_up({0: 5}, until_ms=10**13)


def test_caught_up_trusts_the_fetched_high_watermark_over_a_low_listed_end() -> None:
    """The embedded broker lists the end of a partition whose last batch holds offsets 7-9 as 8."""
    progress = ReviewProgress()
    progress.start(0, committed=7)
    progress.fetched(0, [(7, 100), (8, 100), (9, 100)], position=10, highwater=10)
    progress.applied(0, 7)
    assert log_end(8, 10) == 10
    assert not progress.caught_up({0: 8}, until_ms=100)
    progress.applied(0, 8)
    assert not progress.caught_up({0: 8}, until_ms=100)
    progress.applied(0, 9)
    assert progress.caught_up({0: 8}, until_ms=100)


def test_caught_up_needs_records_fetched_before_it_can_judge_their_time() -> None:
    progress = ReviewProgress()
    assert not progress.caught_up({0: 0}, until_ms=0)  # partition not started: backlog unknown
    progress.start(0, committed=0)
    progress.start(1, committed=0)
    assert progress.caught_up({0: 0, 1: 0}, until_ms=0)  # both empty
    assert not progress.caught_up({0: 2, 1: 0}, until_ms=0)  # two records not fetched yet
    progress.fetched(0, [(0, 500), (1, 300)], position=2, highwater=2)
    progress.fetched(1, [], position=0, highwater=0)
    assert progress.caught_up({0: 2, 1: 0}, until_ms=299)  # both waiting records are newer
    assert not progress.caught_up({0: 2, 1: 0}, until_ms=300)  # out of order: the second is not newer
    progress.applied(0, 0)
    progress.applied(0, 1)
    assert progress.caught_up({0: 2, 1: 0}, until_ms=10**13)


# -- verdict order (pure logic) ---------------------------------------------------------------------

def _hashes(md5: str) -> Hashes:
    return Hashes(md5=md5, pdq="0" * 64, pdq_quality=100)


def _verdict(image_id: str, event_id: str) -> Verdict:
    return Verdict(event_id=event_id, image_id=image_id, action="allow", label="normal", score=0.1,
                   source="model", signals=Signals(knn=0.1, cnn=0.1), hashes=_hashes("0" * 32),
                   model_version="test", latency_ms=1.0)


def test_verdicts_sort_by_timestamp_across_partitions_then_partition_and_offset() -> None:
    records = [TimedVerdict(300, 0, 0, _verdict("a", "1")), TimedVerdict(100, 1, 0, _verdict("b", "2")),
               TimedVerdict(200, 0, 1, _verdict("c", "3")), TimedVerdict(100, 0, 2, _verdict("d", "4"))]
    assert [t.verdict.image_id for t in time_ordered(records)] == ["d", "b", "c", "a"]


def test_since_takes_durations_and_date_times() -> None:
    now = 1_800_000_000_000
    assert parse_since("90s", now) == now - 90_000
    assert parse_since("15m", now) == now - 900_000
    assert parse_since("2h", now) == now - 7_200_000
    assert parse_since("1d", now) == now - 86_400_000
    assert parse_since("2026-11-23T10:00:00Z") == parse_since("2026-11-23T11:00:00+01:00")
    assert parse_since("2026-11-23T10:00:00") == parse_since("2026-11-23T10:00:00Z")  # UTC when no offset
    for bad in ("yesterday", "-5m", "15 minutes", ""):
        with pytest.raises(ValueError):
            parse_since(bad, now)


# -- through the real broker ------------------------------------------------------------------------

def config_file(settings, folder: Path) -> str:
    path = folder / "modstream.yaml"
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    return str(path)


@pytest.mark.integration
def test_verdicts_print_in_time_order_with_since_and_image_filters(make_settings, tmp_path, capsys) -> None:
    settings = make_settings()
    ensure_topics(settings)
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap, acks="all")
    base = 1_900_000_000_000  # written out of time order, newest first on partition 0
    sends = [(0, base + 3000, "late"), (1, base + 1000, "first"), (0, base + 4000, "last"),
             (1, base + 2000, "second"), (0, base, "before-since")]
    for partition, timestamp, image_id in sends:
        producer.send(settings.topics.verdicts, value=_verdict(image_id, f"e-{image_id}").model_dump_json(
            by_alias=True).encode(), partition=partition, timestamp_ms=timestamp)
    producer.send(settings.topics.verdicts, value=b"{not a verdict", partition=1, timestamp_ms=base + 1500)
    producer.flush()
    producer.close()
    config = config_file(settings, tmp_path)

    assert main(["verdicts", "--json", "--config", config, "--since", "2030-03-17T17:46:40.500Z"]) == 0
    out, err = capsys.readouterr()
    assert base + 500 == parse_since("2030-03-17T17:46:40.500Z")
    assert [json.loads(line)["image_id"] for line in out.splitlines()] == ["first", "second", "late", "last"]
    assert "skipping malformed verdict" in err

    assert main(["verdicts", "--json", "--config", config, "--image", "second"]) == 0
    assert [json.loads(line)["event_id"] for line in capsys.readouterr().out.splitlines()] == ["e-second"]

    assert main(["verdicts", "--config", config]) == 0  # the table: newest last
    assert capsys.readouterr().out.splitlines()[-1].startswith("last ")


@pytest.mark.integration
def test_review_command_fails_without_an_acknowledgement(capsys) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["review", "img-1", "adult", "--bootstrap", f"127.0.0.1:{port}", "--timeout", "2"]) == 2
    err = capsys.readouterr().err
    assert "img-1 was not sent" in err and "published" not in err


@pytest.mark.parametrize("flags", [["--pdq", "zz"], ["--md5", "x" * 32], ["--pdq", "0" * 6400]])
def test_review_command_refuses_bad_hashes_with_a_message(flags: list[str], capsys) -> None:
    assert main(["review", "img-1", "adult", "--bootstrap", "127.0.0.1:1", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("modstream review: ") and "Traceback" not in err and "published" not in err


@pytest.mark.integration
def test_review_command_says_published_once_acknowledged(make_settings, tmp_path, capsys) -> None:
    settings = make_settings()
    ensure_topics(settings)
    assert main(["review", "img-2", "normal", "--config", config_file(settings, tmp_path)]) == 0
    assert "img-2 -> normal published" in capsys.readouterr().err
    consumer = make_consumer(settings, topics=None, group_id=None)  # no group join to wait for
    read_from_beginning(consumer, [settings.topics.reviews])
    records = wait_for(lambda: [r for batch in consumer.poll(timeout_ms=200).values() for r in batch],
                       timeout_s=30, message="the review on the topic")
    consumer.close()
    assert [json.loads(r.value)["image_id"] for r in records] == ["img-2"]


# -- through the real pipeline ----------------------------------------------------------------------

def _score_original_then_stop(start_pipeline, settings, image: Path) -> Verdict:
    pipeline, outputs = start_pipeline(settings)
    publish_events(settings, [upload_event_for(image, inline=True)])
    outputs.wait(1)
    verdict = outputs.by_image()[image.stem]
    pipeline.stop()
    return verdict


def _resized(path: Path, folder: Path, factor: float = 0.6) -> Path:
    from PIL import Image

    image = Image.open(path)
    target = folder / f"{path.stem}-resized.jpg"
    image.resize((int(image.width * factor), int(image.height * factor)), Image.Resampling.LANCZOS).save(
        target, quality=90)
    return target


def _publish_raw(settings, topic: str, value: bytes) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap, acks="all")
    producer.send(topic, value=value, key=b"junk").get(timeout=30)
    producer.close()


def _committed_reviews(settings) -> int:
    consumer = make_consumer(settings, topics=None, group_id=f"{settings.kafka.group_id}-reviews")
    try:
        return sum(consumer.committed(TopicPartition(settings.topics.reviews, p)) or 0
                   for p in range(settings.topics.partitions))
    finally:
        consumer.close()


class DelayedApplier(ReviewApplier):
    """The real applier, slowed: each decision takes effect only after a delay."""

    delay_s = 2.0

    def apply(self, decision: ReviewDecision) -> dict:
        time.sleep(self.delay_s)
        return super().apply(decision)


class SlowedReviewFeedback:
    """Stands in for the ReviewFeedback actor class in workers.pipeline: the real actor, with the
    DelayedApplier, so the review consumer lags however quickly the broker serves it."""

    @staticmethod
    def options(**options):
        actor = ReviewFeedback.options(**options)
        return SimpleNamespace(remote=lambda *args: actor.remote(*args, make_applier=DelayedApplier))


@pytest.mark.integration
@pytest.mark.parametrize("slowed", [False, True], ids=["plain", "review-consumer-slowed"])
def test_a_review_published_before_its_copy_applies_to_it_on_start(start_pipeline, make_settings, tmp_path,
                                                                   monkeypatch, slowed: bool) -> None:
    """The scenario of the report: scored once, then a review and a resized copy arrive while the
    pipeline is down. Slowed, the review sits behind three others and each takes two seconds to
    apply: ingest would be polling long before the review took effect."""
    settings = make_settings()
    original = SAMPLES / "cat.jpg"
    model = _score_original_then_stop(start_pipeline, settings, original)
    label = "normal" if model.label == "adult" else "adult"

    others = [ReviewDecision(image_id=f"other-{i}", label="adult", reviewer="bulk") for i in range(3 if slowed else 0)]
    for decision in [*others, ReviewDecision(image_id=original.stem, label=label, reviewer="test")]:
        publish_review(settings, decision)
    _publish_raw(settings, settings.topics.reviews, b'{"schema": 1, "image_id": "x"}')  # no label: malformed
    copy = upload_event_for(_resized(original, tmp_path), inline=True, image_id="cat-copy")
    publish_events(settings, [copy])

    if slowed:
        monkeypatch.setattr("workers.pipeline.ReviewFeedback", SlowedReviewFeedback)
    pipeline, outputs = start_pipeline(settings)
    outputs.wait(2, dead_letters=1)
    verdict = outputs.by_image()["cat-copy"]
    assert (verdict.action, verdict.label, verdict.source, verdict.matched_image_id) == \
        (REVIEW_ACTIONS[label][0], label, "review_cache", original.stem)
    [dead] = outputs.dead_letters
    assert (dead.reason, dead.original) == ("invalid_event", {"schema": 1, "image_id": "x"})
    assert dead.event_id.startswith(f"{settings.topics.reviews}-")
    wait_for(lambda: _committed_reviews(settings) == len(others) + 2, message="every review record committed")
    assert pipeline.stats()["reviews_applied"] == len(others) + 1


@pytest.mark.integration
def test_a_review_survives_a_restart_through_the_changelog_not_by_being_applied_again(start_pipeline, make_settings,
                                                                                      tmp_path) -> None:
    settings = make_settings()
    original = SAMPLES / "rocket.jpg"
    pipeline, outputs = start_pipeline(settings)
    publish_events(settings, [upload_event_for(original, inline=True)])
    outputs.wait(1)
    label = "normal" if outputs.by_image()[original.stem].label == "adult" else "adult"
    publish_review(settings, ReviewDecision(image_id=original.stem, label=label, reviewer="test"))
    wait_for(lambda: pipeline.stats()["reviews_applied"] == 1, message="the review applied")
    pipeline.stop()

    restarted, outputs = start_pipeline(settings)  # returns once the review backlog is applied
    assert restarted.stats()["reviews_applied"] == 0  # committed: the state came back from the changelog
    publish_events(settings, [upload_event_for(_resized(original, tmp_path), inline=True, image_id="rocket-copy")])
    outputs.wait(2)
    copy = outputs.by_image()["rocket-copy"]
    assert (copy.action, copy.label, copy.source, copy.matched_image_id) == \
        (REVIEW_ACTIONS[label][0], label, "review_cache", original.stem)


# -- re-issue (pure logic) --------------------------------------------------------------------------

def _scored(image_id: str, event_id: str, label: str = "normal", matched: str | None = None,
            md5: str = "0" * 32) -> Verdict:
    action = "allow" if label == "normal" else "block"
    source = "near_duplicate" if matched else "model"
    return Verdict(event_id=event_id, image_id=image_id, action=action, label=label, score=0.2, source=source,
                   matched_image_id=matched, signals=Signals(), hashes=_hashes(md5),
                   model_version="test", latency_ms=5.0)


def test_a_review_corrects_the_recent_copies_that_disagree_once_per_review_record() -> None:
    recent = RecentVerdicts(keep_ms=1000)
    recent.add(_scored("img", "e1"), 500)
    recent.add(_scored("img-copy", "e2", matched="img"), 600)
    recent.add(_scored("same-bytes", "e3", md5="a" * 32), 700)
    recent.add(_scored("img-old", "e4", matched="img"), 100)  # before the window
    recent.add(_scored("other", "e5"), 650)
    recent.add(_scored("img-agrees", "e6", label="adult", matched="img"), 650)
    review = ReviewDecision(image_id="img", label="adult", reviewer="r")

    fixes = recent.corrections(review, "a" * 32, "rev-0@7", since_ms=400, now_ms=900)
    assert sorted(v.supersedes for v in fixes) == ["e1", "e2", "e3"]
    assert {(v.action, v.label, v.source, v.matched_image_id) for v in fixes} == \
        {("block", "adult", "review_cache", "img")}
    assert {v.event_id for v in fixes} == {reissue_event_id(e, "rev-0@7") for e in ("e1", "e2", "e3")}
    assert fixes[0].hashes == recent.first(fixes[0].supersedes).hashes

    for fix in fixes:  # read back from the topic (after a restart, too): nothing left to re-issue
        recent.add(fix, 950)
    assert recent.corrections(review, "a" * 32, "rev-0@7", since_ms=400, now_ms=960) == []
    # A later review the other way corrects the corrections, with new ids.
    back = recent.corrections(ReviewDecision(image_id="img", label="normal", reviewer="r"), None, "rev-1@2",
                              since_ms=400, now_ms=970)
    assert sorted(v.supersedes for v in back) == ["e1", "e2", "e6"]  # e3 matched by MD5 only in the first
    assert {v.event_id for v in back}.isdisjoint(v.event_id for v in fixes)


def test_recent_verdicts_forget_what_left_the_window() -> None:
    recent = RecentVerdicts(keep_ms=100)
    recent.add(_scored("a", "e1"), 1000)
    recent.add(_scored("b", "e2"), 1200)
    recent.prune(now_ms=1250)
    assert list(recent.events) == ["e2"]


# -- re-issue through the real pipeline -------------------------------------------------------------

def _rewind_reviews(settings) -> None:
    """Set the review group back to the start, as if the last run died before committing."""
    from kafka.structs import OffsetAndMetadata

    consumer = make_consumer(settings, topics=None, group_id=f"{settings.kafka.group_id}-reviews")
    try:
        partitions = [TopicPartition(settings.topics.reviews, p) for p in range(settings.topics.partitions)]
        consumer.assign(partitions)
        consumer.commit({tp: OffsetAndMetadata(0, "", -1) for tp in partitions})
    finally:
        consumer.close(autocommit=False)


@pytest.mark.integration
def test_a_late_review_reissues_superseding_verdicts_exactly_once_across_a_restart(start_pipeline, make_settings,
                                                                                  tmp_path) -> None:
    settings = make_settings(pipeline={"reissue_window_s": 600})
    original = SAMPLES / "cat.jpg"
    pipeline, outputs = start_pipeline(settings)
    publish_events(settings, [upload_event_for(original, inline=True)])
    outputs.wait(1)
    publish_events(settings, [upload_event_for(_resized(original, tmp_path), inline=True, image_id="cat-copy")])
    outputs.wait(2)
    scored = outputs.by_image()
    assert scored["cat-copy"].matched_image_id == original.stem
    label = "normal" if scored[original.stem].label == "adult" else "adult"

    publish_review(settings, ReviewDecision(image_id=original.stem, label=label, reviewer="test"))
    wait_for(lambda: pipeline.stats()["reviews_reissued"] >= 2, message="two verdicts re-issued")
    pipeline.stop()
    _rewind_reviews(settings)

    restarted, outputs = start_pipeline(settings)
    wait_for(lambda: restarted.stats()["reviews_applied"] >= 1, message="the review applied again")
    assert restarted.stats()["reviews_reissued"] == 0
    publish_events(settings, [upload_event_for(original, inline=True, image_id="cat-again")])
    outputs.wait(5)  # two first verdicts, two re-issued, one for the new copy

    verdicts = list(read_verdicts(settings, follow=False))
    superseding = [v for v in verdicts if v.supersedes is not None]
    assert sorted(v.supersedes for v in superseding) == sorted(v.event_id for v in scored.values())
    action = REVIEW_ACTIONS[label][0]
    assert {(v.action, v.label, v.source, v.matched_image_id) for v in superseding} == \
        {(action, label, "review_cache", original.stem)}
    assert {v.image_id: v.hashes for v in superseding} == {v.image_id: v.hashes for v in scored.values()}
    again = next(v for v in verdicts if v.image_id == "cat-again")
    assert (again.action, again.source, again.supersedes) == (action, "review_cache", None)


# -- failures while applying, through the real broker (faults injected into the applier) -------------

class FlakyApplier:
    """Raises the given failures for image ids that have them, in order, then applies (records the id)."""

    def __init__(self, failures: dict[str, list[BaseException]]) -> None:
        self.failures = failures
        self.applied: list[str] = []

    def apply(self, decision: ReviewDecision) -> dict:
        pending = self.failures.get(decision.image_id)
        if pending:
            raise pending.pop(0)
        self.applied.append(decision.image_id)
        return {"image_id": decision.image_id}


def _dead_letters(settings, count: int) -> list:
    from common.messages import parse_dead_letter

    consumer = make_consumer(settings, topics=None, group_id=None)
    try:
        from common.kafkaio import read_from_beginning

        read_from_beginning(consumer, [settings.topics.dlq])
        found: list = []
        wait_for(lambda: found.extend(parse_dead_letter(r.value) for batch in consumer.poll(timeout_ms=200).values()
                                      for r in batch) or len(found) >= count, timeout_s=60,
                 message=f"{count} dead letters")
        return found
    finally:
        consumer.close()


@pytest.mark.integration
def test_broker_errors_are_retried_and_a_decision_that_keeps_failing_is_dead_lettered(make_settings) -> None:
    from kafka.errors import KafkaTimeoutError

    from workers.review import APPLY_ATTEMPTS, ReviewFeed

    settings = make_settings(topics={"partitions": 1})
    ensure_topics(settings)
    for image_id in ("flaky", "broken", "fine"):
        publish_review(settings, ReviewDecision(image_id=image_id, label="adult", reviewer="test"))
    applier = FlakyApplier({"flaky": [KafkaTimeoutError("broker away")] * (APPLY_ATTEMPTS + 2),
                            "broken": [ValueError("no such shard")] * (APPLY_ATTEMPTS + 2)})
    feed = ReviewFeed(settings, applier).start()
    try:
        wait_for(lambda: feed.caught_up(10**13), timeout_s=120, message="every review handled")
        assert applier.applied == ["flaky", "fine"]  # transient failures retried beyond the attempts
        assert feed.stats()["reviews_dead_lettered"] == 1
    finally:
        feed.stop()
    [dead] = _dead_letters(settings, 1)
    assert (dead.reason, dead.original["image_id"]) == ("processing_failed", "broken")
    assert dead.detail == "ValueError: no such shard"
    assert _committed_reviews(settings) == 3


@pytest.mark.integration
def test_a_dead_consumer_thread_is_reported_and_commits_nothing_unapplied(make_settings) -> None:
    from workers.review import ReviewFeed

    settings = make_settings(topics={"partitions": 1})
    ensure_topics(settings)
    for image_id in ("first", "fatal", "never"):
        publish_review(settings, ReviewDecision(image_id=image_id, label="normal", reviewer="test"))
    deaths: list[str] = []
    applier = FlakyApplier({"fatal": [SystemExit("interpreter going away")]})
    feed = ReviewFeed(settings, applier, on_death=lambda: deaths.append("dead")).start()
    feed.thread.join(timeout=60)
    assert deaths == ["dead"] and not feed.alive()
    assert applier.applied == ["first"]
    assert not feed.caught_up(10**13)
    assert _committed_reviews(settings) == 0  # the commit comes after a poll's records: none was made
