"""The pipeline end to end: real embedded broker, real local Ray, real model."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import kafka.record.default_records as default_records
import pytest
import ray
from PIL import Image

from common.messages import ReviewDecision, UploadEvent
from deploy.clients import publish_events, publish_review, upload_event_for
from deploy.demo import publish_malformed
from tests.conftest import wait_for
from tests.test_kafkaio import patched, produce

SAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "samples"
pytestmark = pytest.mark.integration


def resized(path: Path, folder: Path, factor: float = 0.5, name: str | None = None) -> Path:
    image = Image.open(path)
    target = folder / (name or f"{path.stem}-resized.jpg")
    image.resize((int(image.width * factor), int(image.height * factor)), Image.Resampling.LANCZOS).save(
        target, quality=90)
    return target


def reencoded(path: Path, folder: Path) -> Path:
    target = folder / f"{path.stem}-q40.jpg"
    Image.open(path).save(target, quality=40)
    return target


def test_end_to_end_sources_matches_and_dead_letters(start_pipeline, tmp_path) -> None:
    pipeline, outputs = start_pipeline()
    settings = pipeline.settings
    originals = sorted(SAMPLES.glob("*.jpg"))[:4]
    original_events = [upload_event_for(p, inline=False) for p in originals]
    publish_events(settings, original_events)
    outputs.wait(len(originals))

    exact = tmp_path / "exact.jpg"
    shutil.copyfile(originals[0], exact)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(originals[0].read_bytes()[:1500])
    text = tmp_path / "text.jpg"
    text.write_text("hello")
    copies = [
        upload_event_for(exact, inline=False, image_id="exact-copy"),
        upload_event_for(resized(originals[1], tmp_path), inline=True, image_id="resized-copy"),
        upload_event_for(reencoded(originals[2], tmp_path), inline=False, image_id="reencoded-copy"),
    ]
    bad = [
        upload_event_for(truncated, inline=False, image_id="truncated"),
        upload_event_for(text, inline=False, image_id="text"),
        UploadEvent(event_id="gone", image_id="gone", uri=(tmp_path / "missing.jpg").as_uri()),
        UploadEvent(event_id="remote", image_id="remote", uri="http://169.254.169.254/latest/meta-data"),
    ]
    # Inside one batch too: a new image and its exact copy.
    fresh = SAMPLES / "rocket.jpg"  # keyed to the same partition as "twin": the original is read first
    twin = tmp_path / "twin.jpg"
    shutil.copyfile(fresh, twin)
    same_batch = [upload_event_for(fresh, inline=False), upload_event_for(twin, inline=False, image_id="twin")]
    publish_events(settings, copies + bad + same_batch)
    publish_malformed(settings, [b"not json at all", b'{"schema": 1, "event_id": "no-image"}'])
    outputs.wait(len(originals) + len(copies) + len(same_batch), dead_letters=len(bad) + 2)

    verdicts = outputs.by_image()
    assert {v.event_id for v in outputs.verdicts} == {e.event_id for e in [*original_events, *copies,
                                                                           *same_batch]}
    assert len(outputs.verdicts) == len({v.event_id for v in outputs.verdicts})  # one verdict per event
    for original in originals:
        verdict = verdicts[original.stem]
        assert verdict.source == "model" and verdict.matched_image_id is None
        assert verdict.signals.cnn is not None and verdict.model_version == pipeline.bundle_id
    assert (verdicts["exact-copy"].source, verdicts["exact-copy"].matched_image_id) == \
        ("exact_duplicate", originals[0].stem)
    assert (verdicts["resized-copy"].source, verdicts["resized-copy"].matched_image_id) == \
        ("near_duplicate", originals[1].stem)
    assert (verdicts["reencoded-copy"].source, verdicts["reencoded-copy"].matched_image_id) == \
        ("near_duplicate", originals[2].stem)
    assert verdicts["resized-copy"].signals.cnn is None  # never reached the CNN
    assert verdicts["exact-copy"].action == verdicts[originals[0].stem].action
    assert (verdicts["twin"].source, verdicts["twin"].matched_image_id) == ("exact_duplicate", fresh.stem)
    assert pipeline.stats()["decodes_skipped"] >= 1  # the exact copy: its bytes were loaded before

    reasons = {d.event_id: d.reason for d in outputs.dead_letters}
    assert reasons[bad[0].event_id] == "decode_failed"
    assert reasons[bad[1].event_id] == "unsupported_format"
    assert reasons["gone"] == "fetch_failed"
    assert reasons["remote"] == "fetch_failed"
    malformed = [d for d in outputs.dead_letters if d.reason == "invalid_event"]
    assert len(malformed) == 2 and {d.event_id for d in malformed} >= {"no-image"}
    assert len(outputs.dead_letters) == len(bad) + 2


def test_review_turns_a_later_resized_copy_into_block(start_pipeline, tmp_path) -> None:
    pipeline, outputs = start_pipeline()
    settings = pipeline.settings
    original = SAMPLES / "cat.jpg"
    publish_events(settings, [upload_event_for(original, inline=False)])
    outputs.wait(1)
    assert outputs.by_image()["cat"].action != "block"

    publish_review(settings, ReviewDecision(image_id="cat", label="adult", reviewer="test"))
    wait_for(lambda: pipeline.stats().get("reviews_applied", 0) >= 1, message="review applied")
    later = upload_event_for(resized(original, tmp_path, 0.5), inline=True, image_id="cat-small")
    publish_events(settings, [later])
    outputs.wait(2)
    verdict = outputs.by_image()["cat-small"]
    assert (verdict.action, verdict.label, verdict.source, verdict.matched_image_id) == \
        ("block", "adult", "review_cache", "cat")
    knn_sizes = ray.get([replica.size.remote() for replica in pipeline.knn_replicas])
    assert knn_sizes == [1] * len(knn_sizes)  # the reviewed image is now a kNN reference


def test_dedup_state_survives_a_restart(start_pipeline, make_settings) -> None:
    settings = make_settings()
    first, outputs = start_pipeline(settings)
    original = SAMPLES / "rocket.jpg"
    publish_events(settings, [upload_event_for(original, inline=False)])
    outputs.wait(1)
    first.stop()

    _, outputs = start_pipeline(settings)
    copy = UploadEvent(event_id=str(uuid.uuid4()), image_id="rocket-again",
                       data_b64=__import__("base64").b64encode(original.read_bytes()).decode())
    publish_events(settings, [copy])
    outputs.wait(2)
    verdict = outputs.by_image()["rocket-again"]
    assert (verdict.source, verdict.matched_image_id) == ("exact_duplicate", "rocket")


def test_review_by_hashes_applies_to_an_image_not_yet_seen(start_pipeline) -> None:
    from common.features import md5_hex

    pipeline, outputs = start_pipeline()
    settings = pipeline.settings
    image = SAMPLES / "camera.jpg"
    publish_review(settings, ReviewDecision(image_id="elsewhere-1", label="adult", reviewer="test",
                                            md5=md5_hex(image.read_bytes())))
    wait_for(lambda: pipeline.stats().get("reviews_applied", 0) >= 1, message="review applied")
    publish_events(settings, [upload_event_for(image, inline=False, image_id="camera-upload")])
    outputs.wait(1)
    verdict = outputs.by_image()["camera-upload"]
    assert (verdict.action, verdict.source, verdict.matched_image_id) == ("block", "review_cache", "elsewhere-1")


def test_the_pipeline_on_kafka_python_answers_copies_bad_records_and_learns_a_review(
        start_pipeline, make_settings, broker, tmp_path) -> None:
    """Every Kafka client of the pipeline (ingest, sink, review consumer, dedup changelog, bank
    follower) on kafka-python, the other client (the rest of the suite runs on librdkafka):
    verdicts, a copy from dedup, dead letters for a malformed record and an undecodable batch,
    and a review that blocks a later resized copy."""
    pipeline, outputs = start_pipeline(make_settings(kafka={"client": "kafka-python"}))
    settings = pipeline.settings
    cat, other = SAMPLES / "cat.jpg", sorted(SAMPLES.glob("*.jpg"))[0]
    publish_events(settings, [upload_event_for(cat, inline=False), upload_event_for(other, inline=False)])
    outputs.wait(2)  # the copy, on another partition, must not be read before its original
    publish_events(settings, [upload_event_for(cat, inline=True, image_id="cat-copy")])
    publish_malformed(settings, [b"not json at all"])
    with patched(default_records, "lz4_encode", lambda data: b"not an lz4 frame"):
        produce(broker.bootstrap, settings.topics.uploads, 0, [b"z" * 100 for _ in range(3)],
                compression_type="lz4")
    outputs.wait(3, dead_letters=2)
    verdicts = outputs.by_image()
    assert verdicts["cat"].source == "model" and verdicts["cat"].action != "block"
    assert (verdicts["cat-copy"].source, verdicts["cat-copy"].matched_image_id) == ("exact_duplicate", "cat")
    assert [letter.reason for letter in outputs.dead_letters] == ["invalid_event"] * 2
    assert any(letter.detail.startswith("undecodable record batch") for letter in outputs.dead_letters)

    publish_review(settings, ReviewDecision(image_id="cat", label="adult", reviewer="test"))
    wait_for(lambda: pipeline.stats().get("reviews_applied", 0) >= 1, message="review applied")
    publish_events(settings, [upload_event_for(resized(cat, tmp_path), inline=True, image_id="cat-small")])
    outputs.wait(4, dead_letters=2)
    verdict = outputs.by_image()["cat-small"]
    assert (verdict.action, verdict.source, verdict.matched_image_id) == ("block", "review_cache", "cat")
