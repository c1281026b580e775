"""Every suite's default sizes, full and ``--quick``, in one light module: the CLI's help
shows them without importing the suites, and the suites take them from here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Size(Generic[T]):
    full: T
    quick: T

    def pick(self, given: T | None, quick: bool) -> T:
        """The option as given, else this size for the kind of run."""
        if given is not None:
            return given
        return self.quick if quick else self.full


REPEATS = Size(3, 2)
KNN_REFS = Size(100_000, 5_000)
KNN_QUERIES = Size(200, 50)
DEDUP_HASHES = Size((1_000_000, 10_000_000), (50_000,))
DEDUP_QUERIES = Size(100, 40)
FEATURE_IMAGES = Size(4, 1)
FEATURE_SIZES = Size(("1024x768", "4000x3000"), ("1024x768", "4000x3000"))
FEATURE_MEASURE_S = Size(0.25, 0.02)  # a measurement repeats its images until it lasts this long
BATCHES = Size((1, 8, 32, 64), (1, 8))
CLASSIFIER_IMAGES = Size(256, 32)
PIPELINE_IMAGES = Size(1000, 24)
PIPELINE_IMAGE_SIZE = Size("1024x768", "320x240")
PIPELINE_REFERENCES = Size(10_000, 1_000)
PIPELINE_IDLE_S = Size(10.0, 1.0)  # seconds of the started pipeline doing nothing, for its idle CPU
BASELINE_SAMPLE = Size(100, 8)
BASELINE_CNN_IMAGES = Size(128, 16)  # inputs per CNN measurement (the sample's, repeated)
COMPRESSION_RECORDS = Size(20_000, 500)
KAFKA_CLIENT_RECORDS = Size(20_000, 500)
KAFKA_CLIENT_IDLE_S = Size(5.0, 1.0)  # seconds an idle consumer is measured, per fetch wait
KAFKA_CLIENT_JOIN_S = Size(8.0, 1.0)  # polling before that: a group join on the embedded broker takes seconds
SCALEOUT_IMAGES = Size(400, 12)  # unique images per scaleout run (three runs)
GPU_RATES = Size((500, 1000, 2000), (500, 1000, 2000))  # CNN replica images/s the sizing table assumes
