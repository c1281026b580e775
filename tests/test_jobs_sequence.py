"""The offline commands in sequence on a small synthetic dataset, then the bundle they built.

data check -> index build -> train cnn -> train fusion -> eval -> explain, through
``modstream``'s own CLI on the session's Ray, as a user would run them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.bundle import load_bundle
from common.cnn import CnnModel
from common.decisions import decide_from_model
from common.features import cnn_input, color_histogram
from common.fetch import LoadLimits
from common.fusion import Thresholds
from deploy.cli import main
from tests.conftest import wait_for
from tests.synthetic_data import Planted, folder_dataset
from workers.jobs import measures
from workers.jobs.datasets import Sample, load_image, read_split

pytestmark = pytest.mark.integration
DRAFT = 256  # the pipeline's default draft size


@dataclass(frozen=True)
class Built:
    planted: Planted
    work: Path
    bundle: Path


def run(*argv: object) -> None:
    assert main([str(arg) for arg in argv]) == 0, argv


@pytest.fixture(scope="module")
def built(ray_cluster, tmp_path_factory) -> Built:
    root = tmp_path_factory.mktemp("offline")
    planted = folder_dataset(root / "data", seed=21, normal=48, adult=20)
    work, bundle = root / "work", root / "bundle"
    run("data", "check", root / "data", "--out", work, "--seed", 3)
    run("index", "build", work, "--bundle", bundle)
    run("train", "cnn", work, "--bundle", bundle, "--epochs", 30, "--augment-copies", 1, "--sweep", 3, "--seed", 3)
    run("train", "fusion", work, "--bundle", bundle, "--target-precision", 0.9, "--target-recall", 0.9)
    run("eval", work, "--bundle", bundle)
    return Built(planted, work, bundle)


def images(samples: list[Sample]) -> list[Image.Image]:
    return [load_image(sample.uri, LoadLimits(), DRAFT)[1] for sample in samples]


def held_out(built: Built) -> list[Sample]:
    return read_split(built.work, "validation") + read_split(built.work, "test")


def test_index_gives_held_out_images_their_label(built) -> None:
    samples = held_out(built)
    index = load_bundle(built.bundle).load_references()
    votes = index.probabilities(np.stack([color_histogram(image) for image in images(samples)]))
    assert len(index) == len(read_split(built.work, "train"))
    right = [(p >= 0.5) == (s.label == 1) for p, s in zip(votes, samples, strict=True)]
    assert np.mean(right) >= 0.9


def test_trained_cnn_beats_chance_on_validation(built) -> None:
    bundle = load_bundle(built.bundle)
    samples = read_split(built.work, "validation")
    scores = CnnModel(bundle.cnn).predict(np.stack([cnn_input(image) for image in images(samples)]))
    measured = measures.classification([s.label for s in samples], scores)
    recorded = bundle.manifest["cnn"]["training"]["validation"]
    assert measured["balanced_accuracy"] >= 0.8  # chance is 0.5
    assert measured["balanced_accuracy"] == pytest.approx(recorded["balanced_accuracy"], abs=0.1)
    assert bundle.manifest["cnn"]["format"] == "frozen_graph" and bundle.manifest["cnn"]["preprocessing"] == "scale_128"


def test_sweep_keeps_the_best_configuration(built) -> None:
    training = load_bundle(built.bundle).manifest["cnn"]["training"]
    assert len(training["sweep"]) == 3
    assert training["validation"]["adult_f1"] == max(entry["adult_f1"] for entry in training["sweep"])


def test_bundle_loads_and_scores_like_the_pipeline(built) -> None:
    bundle = load_bundle(built.bundle)
    assert bundle.id.startswith("trained-")
    model, references, tree = CnnModel(bundle.cnn), bundle.load_references(), bundle.load_fusion()
    limits = bundle.manifest["thresholds"]
    thresholds = Thresholds(block=limits["block"], review=limits["review"])
    test = read_split(built.work, "test")
    for label in (0, 1):
        sample = next(s for s in test if s.label == label)
        (image,) = images([sample])
        knn = references.probability(color_histogram(image))
        cnn = float(model.predict(cnn_input(image)[None])[0])
        decision = decide_from_model(knn, cnn, tree, thresholds)
        assert decision.label == ("adult" if label else "normal"), (sample.uri, knn, cnn)


def test_eval_writes_every_artefact_into_the_bundle(built) -> None:
    out = built.bundle / "eval"
    for name in ("report.md", "metrics.json", "pr_curve.png", "confusion.png", "thresholds.png"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == len(read_split(built.work, "test"))
    summary = load_bundle(built.bundle).manifest["metrics"]["test"]
    assert summary["signals"]["fused"]["confusion"] == metrics["signals"]["fused"]["confusion"]
    planted = built.planted
    assert metrics["dedup"]["exact_duplicates"] == len(planted.exact_copies) + len(planted.placeholders) - 1
    assert metrics["dedup"]["near_duplicates"] == len(planted.resized_copies)


def test_eval_on_a_dataset_of_its_own_cleans_it_first(built, tmp_path) -> None:
    run("eval", built.planted.root, "--bundle", built.bundle, "--out", tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    planted = built.planted  # unreadable files, placeholders and byte copies are dropped, resized copies kept
    assert metrics["images"] == sum(len(paths) for paths in planted.originals.values()) + len(planted.resized_copies)
    assert set(load_bundle(built.bundle).manifest["metrics"]) == {"test", "data"}


def test_explain_overlays_a_heatmap(built, tmp_path) -> None:
    sample = next(s for s in read_split(built.work, "test") if s.label == 1)
    out = tmp_path / "why.png"
    run("explain", sample.uri, "--bundle", built.bundle, "--out", out)
    overlay = Image.open(out)
    (image,) = images([sample])
    assert overlay.format == "PNG" and overlay.size == image.size
    assert np.abs(np.asarray(overlay, dtype=np.int16) - np.asarray(image, dtype=np.int16)).mean() > 5


def test_keras_backbone_fine_tunes_into_a_loadable_bundle(built, tmp_path) -> None:
    import keras

    weights = tmp_path / "mobilenet_v2.weights.h5"  # stands in for a downloaded ImageNet weights file
    keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, include_top=False,
                                   weights=None).save_weights(weights)
    bundle = tmp_path / "keras-bundle"
    run("train", "cnn", built.work, "--bundle", bundle, "--backbone", "mobilenet_v2", "--alpha", 0.35,
        "--backbone-size", 96, "--weights", weights, "--epochs", 1, "--fine-tune-epochs", 1, "--unfreeze", 5,
        "--augment-copies", 1, "--balance", "oversample,tomek,class-weight")
    loaded = load_bundle(bundle)
    assert (loaded.manifest["cnn"]["format"], loaded.manifest["cnn"]["preprocessing"]) == ("keras", "none")
    assert loaded.manifest["cnn"]["training"]["epochs_run"] == 2
    samples = read_split(built.work, "test")[:4]
    scores = CnnModel(loaded.cnn).predict(np.stack([cnn_input(image) for image in images(samples)]))
    assert scores.shape == (4,) and ((scores >= 0) & (scores <= 1)).all()
    run("explain", samples[0].uri, "--bundle", bundle, "--out", tmp_path / "keras-why.png")


@pytest.fixture
def trained_classifier(built, ray_cluster) -> Iterator[None]:
    """The session's Serve classifier swapped for the trained bundle's CNN, and back afterwards."""
    from ray import serve

    from common.bundle import default_bundle
    from common.config import ClassifierConfig
    from workers.classifier import DEPLOYMENT_NAME, classifier_app
    from workers.ingest import APP_NAME

    config = ClassifierConfig(max_batch_size=16)
    serve.run(classifier_app(str(built.bundle), config), name=APP_NAME, route_prefix=None)
    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)
    expected = load_bundle(built.bundle).id
    wait_for(lambda: all(handle.bundle_id.remote().result() == expected for _ in range(5)),
             message="every classifier replica to serve the trained bundle")
    yield
    serve.run(classifier_app(str(default_bundle().path), config), name=APP_NAME, route_prefix=None)


def test_pipeline_runs_on_the_trained_bundle(built, trained_classifier, start_pipeline, make_settings) -> None:
    from deploy.clients import publish_events, upload_event_for

    settings = make_settings().model_copy(update={"bundle": str(built.bundle)})
    pipeline, outputs = start_pipeline(settings)
    test = read_split(built.work, "test")
    publish_events(pipeline.settings, [upload_event_for(Path(s.uri), inline=False, image_id=f"t{i}")
                                       for i, s in enumerate(test)])
    outputs.wait(len(test))
    verdicts = outputs.by_image()
    bundle = load_bundle(built.bundle)
    assert {v.model_version for v in verdicts.values()} == {bundle.id}
    right = [verdicts[f"t{i}"].label == s.label_name for i, s in enumerate(test)]
    assert np.mean(right) >= 0.9


def test_opennsfw_backbone_trains_a_head_into_a_saved_model(built, tmp_path) -> None:
    bundle = tmp_path / "opennsfw-bundle"
    run("train", "cnn", built.work, "--bundle", bundle, "--backbone", "opennsfw", "--epochs", 30,
        "--augment-copies", 1, "--seed", 3)
    loaded = load_bundle(bundle)
    cnn = loaded.manifest["cnn"]
    assert (cnn["format"], cnn["preprocessing"], cnn["resize"]) == ("saved_model", "caffe_bgr", 256)
    assert {entry["license"] for entry in loaded.manifest["licenses"]} == {"BSD-2-Clause", "Apache-2.0"}
    samples = read_split(built.work, "validation")
    scores = CnnModel(loaded.cnn).predict(np.stack([loaded.cnn.model_input(image) for image in images(samples)]))
    measured = measures.classification([s.label for s in samples], scores)
    assert measured["balanced_accuracy"] == pytest.approx(cnn["training"]["validation"]["balanced_accuracy"],
                                                          abs=0.1)  # the installed model is the trained one
    assert measured["balanced_accuracy"] >= 0.7  # chance is 0.5
    run("explain", samples[0].uri, "--bundle", bundle, "--out", tmp_path / "why.png")
