"""``modstream demo``: the whole system on one machine, over the sample images.

The workload shows each method at work: originals (real photographs, see
deploy/samples/README.md) go to the models, exact copies and resized or
re-encoded copies are settled by dedup, bad files and a malformed record go to
the dead-letter topic, and a reviewer's decision turns a later resized copy of
that image into a block.

The demo runs the default bundle (open_nsfw) with a few labelled colour
references added, so the kNN column shows a signal from the first image on:
normal references are other scikit-image photographs (not the samples), adult
references are plain skin-tone colour fields standing in for real ones (the
repository ships no adult images). Every sample is harmless, so the demo fails
if anything but the reviewed image's copy is blocked.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common.bundle import MANIFEST, default_bundle, write_manifest
from common.config import Settings
from common.features import HISTOGRAM_BINS, color_histogram
from common.kafkaio import make_consumer, publish_acknowledged, read_from_beginning
from common.messages import DeadLetter, ReviewDecision, UploadEvent, Verdict, parse_dead_letter, parse_verdict
from deploy.clients import (
    VERDICT_COLUMNS,
    print_table,
    publish_events,
    publish_review,
    upload_event_for,
    verdict_row,
)

SAMPLES = Path(__file__).parent / "samples"
REVIEWED_SAMPLE = "sign"
# scikit-image photographs that are not samples: the demo's normal colour references.
NORMAL_REFERENCES = ("coins", "grass", "gravel", "brick", "hubble_deep_field", "moon", "page", "horse")
# Plain skin-tone fields (RGB) with a little noise: stand-ins for adult references.
ADULT_STAND_INS = ((224, 172, 140), (198, 134, 96), (141, 85, 54), (240, 200, 170))


@dataclass
class Workload:
    originals: list[UploadEvent]
    copies: list[UploadEvent]
    bad: list[UploadEvent]
    malformed: list[bytes]

    @property
    def events(self) -> list[UploadEvent]:
        return [*self.originals, *self.copies, *self.bad]


def build_workload(samples: Path, workdir: Path) -> Workload:
    """Originals, exact copies, resized and re-encoded copies, and bad input, as files."""
    originals = sorted(samples.glob("*.jpg"))
    events = []
    for path in originals[::3]:  # exact copies: same bytes under another id
        copy = workdir / f"{path.stem}-copy.jpg"
        shutil.copyfile(path, copy)
        events.append(upload_event_for(copy, inline=False))
    for path in originals[1::3]:  # resized to half: a near duplicate
        events.append(upload_event_for(_resized(path, workdir, 0.5), inline=True))
    for path in originals[2::3]:  # re-encoded at quality 40: a near duplicate
        reencoded = workdir / f"{path.stem}-q40.jpg"
        Image.open(path).save(reencoded, quality=40)
        events.append(upload_event_for(reencoded, inline=False))
    truncated = workdir / "truncated.jpg"
    truncated.write_bytes(originals[0].read_bytes()[:2000])
    not_an_image = workdir / "notes.jpg"
    not_an_image.write_text("this is not an image\n")
    bad = [upload_event_for(truncated, inline=False), upload_event_for(not_an_image, inline=False),
           UploadEvent(event_id="demo-missing", image_id="missing", uri=(workdir / "gone.jpg").as_uri())]
    return Workload(originals=[upload_event_for(path, inline=False) for path in originals], copies=events,
                    bad=bad, malformed=[b"{not json", b'{"schema": 1, "event_id": "e-1"}'])


def _resized(path: Path, workdir: Path, factor: float) -> Path:
    image = Image.open(path)
    small = image.resize((int(image.width * factor), int(image.height * factor)), Image.Resampling.LANCZOS)
    target = workdir / f"{path.stem}-half.jpg"
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=90)
    target.write_bytes(buffer.getvalue())
    return target


def demo_bundle(workdir: Path) -> Path:
    """The default bundle plus labelled colour references, so the kNN stage has a signal to show."""
    from skimage import data

    from common.knn import LABEL_ADULT, LABEL_NORMAL, ReferenceIndex

    base = default_bundle()
    target = workdir / "bundle"
    shutil.copytree(base.path, target)
    histograms, labels, ids = [], [], []
    for name in NORMAL_REFERENCES:
        pixels = getattr(data, name)()
        pixels = pixels if pixels.dtype == np.uint8 else (pixels * 255).astype(np.uint8)
        histograms.append(color_histogram(Image.fromarray(pixels).convert("RGB")))
        labels.append(LABEL_NORMAL)
        ids.append(f"skimage-{name}")
    rng = np.random.default_rng(0)
    for number, colour in enumerate(ADULT_STAND_INS):
        field = np.clip(rng.normal(colour, 12, (64, 64, 3)), 0, 255).astype(np.uint8)
        histograms.append(color_histogram(Image.fromarray(field, mode="RGB")))
        labels.append(LABEL_ADULT)
        ids.append(f"skin-tone-{number}")
    index = ReferenceIndex(dim=HISTOGRAM_BINS)
    index.add(np.stack(histograms), labels, ids)
    shutil.rmtree(target / "knn")
    index.save(target / "knn")
    manifest = json.loads((target / MANIFEST).read_text())
    manifest["id"] = f"demo-{base.id}"
    manifest["knn"] = {**manifest["knn"], "references": len(labels),
                       "note": "demo: scikit-image photographs (normal) and skin-tone colour fields (adult)"}
    write_manifest(target, manifest)
    return target


def harmless_blocks(verdicts: Iterable[Verdict]) -> list[Verdict]:
    """Blocks the demo must not make: every sample is harmless, only a reviewer's decision may block."""
    return [v for v in verdicts if v.action == "block" and v.source != "review_cache"]


def publish_malformed(settings: Settings, values: Iterable[bytes]) -> None:
    publish_acknowledged(settings, settings.topics.uploads, (("malformed", value) for value in values))


class Outputs:
    """Reads verdicts and dead letters as they arrive, without joining a group."""

    def __init__(self, settings: Settings) -> None:
        self.verdicts: dict[str, Verdict] = {}
        self.dead_letters: list[DeadLetter] = []
        self.consumer = make_consumer(settings, topics=None, group_id=None)
        read_from_beginning(self.consumer, [settings.topics.verdicts, settings.topics.dlq])
        self.verdict_topic = settings.topics.verdicts

    def wait_for(self, verdicts: int, dead_letters: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.verdicts) < verdicts or len(self.dead_letters) < dead_letters:
            if time.monotonic() > deadline:
                raise TimeoutError(f"saw {len(self.verdicts)}/{verdicts} verdicts and "
                                   f"{len(self.dead_letters)}/{dead_letters} dead letters in {timeout_s}s")
            for tp, records in self.consumer.poll(timeout_ms=200).items():
                for record in records:
                    if tp.topic == self.verdict_topic:
                        verdict = parse_verdict(record.value)
                        self.verdicts[verdict.event_id] = verdict
                    else:
                        self.dead_letters.append(parse_dead_letter(record.value))

    def close(self) -> None:
        self.consumer.close()


def summary(verdicts: list[Verdict], dead_letters: list[DeadLetter], events: int, seconds: float) -> str:
    actions = Counter(v.action for v in verdicts)
    sources = Counter(v.source for v in verdicts)
    reasons = Counter(d.reason for d in dead_letters)
    no_cnn = sum(1 for v in verdicts if v.signals.cnn is None)
    models = [v for v in verdicts if v.source == "model"]
    with_knn = [v.signals.knn for v in models if v.signals.knn is not None]
    cnn = [v.signals.cnn for v in models if v.signals.cnn is not None]
    latencies = np.array([v.latency_ms for v in verdicts]) if verdicts else np.zeros(1)
    lines = [
        f"events            {events}",
        f"verdicts          {len(verdicts)}  by action: {dict(sorted(actions.items()))}",
        f"                  by source: {dict(sorted(sources.items()))}",
        f"dead letters      {len(dead_letters)}  by reason: {dict(sorted(reasons.items()))}",
        (f"model verdicts    {len(models)}  kNN signal on {len(with_knn)}"
         + (f" (P(adult) {min(with_knn):.3f}-{max(with_knn):.3f})" if with_knn else "")
         + (f", CNN P(adult) {min(cnn):.3f}-{max(cnn):.3f}" if cnn else "")),
        f"model version     {', '.join(sorted({v.model_version for v in verdicts}))}",
        (f"never reached CNN {no_cnn}/{events} events ({100 * no_cnn / max(events, 1):.0f}%; "
         f"{100 * (no_cnn + len(dead_letters)) / max(events, 1):.0f}% with dead letters)"),
        f"throughput        {len(verdicts) / max(seconds, 1e-9):.1f} images/s over {seconds:.1f} s",
        f"latency           p50 {np.percentile(latencies, 50):.0f} ms, p95 {np.percentile(latencies, 95):.0f} ms",
    ]
    return "\n".join(lines)


def run_demo(settings: Settings, samples: Path = SAMPLES) -> int:
    from common.raysession import ray_session
    from deploy.runner import kafka_for
    from workers.pipeline import Pipeline

    with tempfile.TemporaryDirectory(prefix="modstream-demo-") as tmp, kafka_for(settings) as settings, \
            ray_session(settings.ray_address, settings.metrics_port):
        workdir = Path(tmp)
        # The demo's events point at its samples and at copies in its own temp folder: only those.
        demo_settings = settings.model_copy(update={
            "limits": settings.limits.model_copy(
                update={"file_roots": (*settings.limits.file_roots, str(samples), str(workdir))}),
            "bundle": str(demo_bundle(workdir))})
        workload = build_workload(samples, workdir)
        print("starting the pipeline (local Ray, Serve classifier, dedup, kNN, review feedback)...",
              file=sys.stderr, flush=True)
        pipeline = Pipeline(demo_settings).start()
        outputs = Outputs(demo_settings)
        try:
            started = time.monotonic()
            publish_events(demo_settings, workload.originals)
            outputs.wait_for(len(workload.originals), 0, timeout_s=120)
            publish_events(demo_settings, workload.copies + workload.bad)
            publish_malformed(demo_settings, workload.malformed)
            dead_expected = len(workload.bad) + len(workload.malformed)
            valid = len(workload.originals) + len(workload.copies)
            outputs.wait_for(valid, dead_expected, timeout_s=120)
            reviewed = next(e for e in workload.events if e.image_id == REVIEWED_SAMPLE)
            print(f"a reviewer marks {REVIEWED_SAMPLE} as adult (a planted decision, to show the feedback "
                  "path); publishing a resized copy of it...", file=sys.stderr, flush=True)
            publish_review(demo_settings, ReviewDecision(image_id=reviewed.image_id, label="adult", reviewer="demo"))
            _wait_for_reviews(pipeline, 1)
            copy = upload_event_for(_resized(samples / f"{REVIEWED_SAMPLE}.jpg", workdir, 0.5), inline=True,
                                    image_id=f"{REVIEWED_SAMPLE}-resized-after-review")
            publish_events(demo_settings, [copy])
            outputs.wait_for(valid + 1, dead_expected, timeout_s=60)
            seconds = time.monotonic() - started
        finally:
            outputs.close()
            pipeline.stop()
        verdicts = sorted(outputs.verdicts.values(), key=lambda v: v.ts)
        print_table([verdict_row(v) for v in verdicts], VERDICT_COLUMNS)
        print()
        for dead in outputs.dead_letters:
            print(f"dead letter  {dead.reason:<18} {dead.event_id}: {dead.detail[:90]}")
        print()
        print(summary(verdicts, outputs.dead_letters, len(workload.events) + len(workload.malformed) + 1,
                      seconds))
        final = outputs.verdicts[copy.event_id]
        ok = final.action == "block" and final.source == "review_cache"
        print(f"\nresized copy after review: {final.action} ({final.source}) -> {'OK' if ok else 'UNEXPECTED'}")
        wrong = harmless_blocks(verdicts)
        print(f"harmless images blocked: {len(wrong)}"
              + (f" ({', '.join(v.image_id for v in wrong)}) -> UNEXPECTED" if wrong else " -> OK"))
        return 0 if ok and not wrong else 1


def _wait_for_reviews(pipeline, count: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while pipeline.stats().get("reviews_applied", 0) < count:
        if time.monotonic() > deadline:
            raise TimeoutError("the review decision was not applied in time")
        time.sleep(0.2)
