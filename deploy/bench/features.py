"""features suite: what ingest spends per image before any model runs (decode, MD5, pHash,
colour histogram, everything extract_features computes), on full decodes against JPEG
draft decodes at the pipeline's draft size."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from common.config import Settings
from common.decode import decode_image, decode_in_process
from common.decodeworker import decoder_usage
from common.features import color_histogram, extract_features, md5_hex, phash_hex
from common.fetch import LoadLimits
from deploy.bench import sizes
from deploy.bench.report import BenchError, Measure, SuiteResult, Table, ratios
from deploy.bench.synthetic import jpeg, photo
from deploy.bench.timing import timed


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    try:
        size = int(width), int(height)
    except ValueError:
        raise BenchError(f"an image size is WIDTHxHEIGHT, got {text!r}") from None
    if min(size) < 32:
        raise BenchError(f"images must be at least 32 x 32, got {text!r}")
    return size


def run(args: argparse.Namespace, settings: Settings) -> SuiteResult:
    image_sizes = [parse_size(text) for text in sizes.FEATURE_SIZES.pick(args.feature_sizes, args.quick)]
    count = sizes.FEATURE_IMAGES.pick(args.feature_images, args.quick)
    draft = (settings.pipeline.draft_size, settings.pipeline.draft_size)
    limits = settings.load_limits()
    result = SuiteResult("features", params={"sizes": [f"{w}x{h}" for w, h in image_sizes], "images_per_size": count,
                                             "draft": f"{draft[0]}x{draft[1]}", "repeats": args.repeats,
                                             "seed": args.seed})
    table = result.table("ms per image, one thread; draft = JPEG draft decode to at least the draft size",
                         ("size", "step", "full decode ms", "draft decode ms", "draft speedup x"))
    rng = np.random.default_rng(args.seed)
    for width, height in image_sizes:
        blobs = [jpeg(photo(rng, width, height)) for _ in range(count)]
        _add_size(table, f"{width}x{height}", blobs, limits, draft, args.repeats,
                  sizes.FEATURE_MEASURE_S.pick(None, args.quick))
    result.notes += [
        "photos: seeded smooth colour fields with grain, JPEG quality 90 (deploy/bench/synthetic.py)",
        "extract_features = MD5 + pHash + pHash quality + histogram + the CNN's 224 x 224 input",
        "images/s per core = 1000 / the CPU ms of decode + extract_features, the decode workers' included",
        ("decoded in process: the same without the decode worker (no hard stop on CPU and memory), measured "
         "alternately with it; the worker's cost x = with / without"),
    ]
    return result


def _add_size(table: Table, size: str, blobs: list[bytes], limits: LoadLimits, draft: tuple[int, int],
              repeats: int, min_s: float) -> None:
    full = [decode_image(data, limits) for data in blobs]
    reduced = [decode_image(data, limits, draft_to=draft) for data in blobs]

    def per_image(step: Callable[[bytes, Image.Image], object], images: list[Image.Image]) -> Measure:
        return _ms_per_image(lambda: [step(data, image) for data, image in zip(blobs, images, strict=True)],
                             len(blobs), repeats, min_s)

    def decode_and_features(**options: tuple[int, int]) -> tuple[Measure, Measure]:
        """What ingest does per image, by the CPU clock of this process and its decode workers; and the
        same with the decode in this process (no worker, no hard stop), measured alternately."""
        def run(decode: Callable[..., Image.Image]) -> Callable[[], object]:
            return lambda: [extract_features(data, decode(data, limits, **options), full[0].size) for data in blobs]

        return _paired_cpu_ms(run(decode_image), run(decode_in_process), len(blobs), repeats, min_s)

    table.add(size=size, step="decode", **_pair(per_image(lambda data, _: decode_image(data, limits), full),
                                                per_image(lambda data, _: decode_image(data, limits, draft_to=draft),
                                                          full)))
    table.add(size=size, step="MD5 of the bytes", **{"full decode ms": per_image(lambda data, _: md5_hex(data), full)})
    for step, fn in (("pHash", lambda _, image: phash_hex(image)),
                     ("colour histogram", lambda _, image: color_histogram(image)),
                     ("extract_features (all)", lambda data, image: extract_features(data, image, image.size))):
        table.add(size=size, step=step, **_pair(per_image(fn, full), per_image(fn, reduced)))
    (full_guarded, full_here), (draft_guarded, draft_here) = decode_and_features(), decode_and_features(
        draft_to=draft)
    table.add(size=size, step="decode + features, CPU ms", **_pair(full_guarded, draft_guarded))
    table.add(size=size, step="images/s per core",
              **{"full decode ms": _per_second(full_guarded), "draft decode ms": _per_second(draft_guarded)})
    table.add(size=size, step="same, decoded in process, CPU ms", **_pair(full_here, draft_here))
    table.add(size=size, step="decode worker's cost x", **{"full decode ms": ratios(full_guarded, full_here),
                                                           "draft decode ms": ratios(draft_guarded, draft_here)})


def _ms_per_image(fn: Callable[[], object], images: int, repeats: int, min_s: float) -> Measure:
    """Wall ms per image; each repeat loops fn for about min_s, to dwarf timer noise."""
    warm, _, _ = timed(fn)
    rounds = max(1, int(min_s / max(warm, 1e-6)))
    samples = [timed(lambda: [fn() for _ in range(rounds)])[0] * 1000 / (rounds * images) for _ in range(repeats)]
    return Measure.of(samples, "ms")


def _paired_cpu_ms(first: Callable[[], object], second: Callable[[], object], images: int, repeats: int,
                   min_s: float) -> tuple[Measure, Measure]:
    """CPU ms per image of two ways of doing the same, measured alternately (their ratio holds when the
    machine's load wanders), each repeat looping for about min_s."""
    rounds = max(1, int(min_s / max(timed(first)[0], 1e-6)))
    samples: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, kept in ((first, samples[0]), (second, samples[1])):
            started = _cpu_seconds()
            for _ in range(rounds):
                fn()
            kept.append((_cpu_seconds() - started) * 1000 / (rounds * images))
    return Measure.of(samples[0], "ms"), Measure.of(samples[1], "ms")


def _cpu_seconds() -> float:
    """CPU of this process and of its decode workers, where every decode runs."""
    return time.process_time() + decoder_usage().cpu_s


def _pair(full: Measure, draft: Measure) -> dict[str, Measure]:
    return {"full decode ms": full, "draft decode ms": draft, "draft speedup x": ratios(full, draft)}


def _per_second(ms: Measure) -> Measure:
    return Measure.of((1000 / sample for sample in ms.samples), "images/s")
