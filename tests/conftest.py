"""Shared fixtures: one embedded broker and one local Ray (with the classifier
deployed once) per test session; unique topic names and groups per test, so
tests never see each other's records."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common.config import Settings, load_settings
from common.kafkaio import ensure_topics, make_consumer, read_from_beginning
from common.messages import DeadLetter, Verdict, parse_dead_letter, parse_verdict
from deploy.broker import EmbeddedBroker
from workers.pipeline import Pipeline

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def modstream_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Default bundles are built here, not in the user's cache."""
    home = tmp_path_factory.mktemp("modstream-home")
    os.environ["MODSTREAM_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as running:
        yield running


@pytest.fixture
def make_settings(broker: EmbeddedBroker, modstream_home: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Settings]:
    """Settings on the session broker with topics and group unique to this call; file:// URIs
    may point into the sample images and every temporary folder of this test session."""
    file_roots = [str(tmp_path_factory.getbasetemp()), str(Path(__file__).resolve().parents[1] / "deploy" / "samples")]

    def factory(**sections: dict) -> Settings:
        tag = uuid.uuid4().hex[:8]
        flags = {
            # Followers fetch every 50 ms, not 500: tests wait on each review and bank marker.
            "kafka": {"bootstrap": broker.bootstrap, "group_id": f"g-{tag}", "follower_fetch_max_wait_ms": 50},
            "topics": {"uploads": f"up-{tag}", "verdicts": f"ver-{tag}", "reviews": f"rev-{tag}",
                       "dlq": f"dlq-{tag}", "state_prefix": f"state-{tag}", "partitions": 2},
            "limits": {"file_roots": file_roots},
        }
        for name, values in sections.items():
            flags[name] = {**flags.get(name, {}), **values}
        return load_settings(flags, env={})

    return factory


@pytest.fixture(scope="session")
def metrics_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Where this session's Ray workers write their metric files."""
    from common.metrics import prepare_multiprocess_dir

    return prepare_multiprocess_dir(str(tmp_path_factory.mktemp("metrics")))


@pytest.fixture(scope="session")
def ray_cluster(modstream_home: Path, metrics_dir: str) -> Iterator[None]:
    """One local Ray for the session, with the classifier deployed on it once."""
    import ray
    from ray import serve

    from common.bundle import default_bundle
    from common.config import ClassifierConfig
    from common.metrics import MULTIPROC_ENV
    from workers.classifier import classifier_app
    from workers.ingest import APP_NAME

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"MODSTREAM_HOME": str(modstream_home), "TF_CPP_MIN_LOG_LEVEL": "2",
                                       MULTIPROC_ENV: metrics_dir}})
    serve.start(proxy_location="Disabled")
    serve.run(classifier_app(str(default_bundle().path), ClassifierConfig(max_batch_size=16)),
              name=APP_NAME, route_prefix=None)
    yield
    serve.shutdown()
    ray.shutdown()


class Outputs:
    """Everything the pipeline wrote to the verdict and dead-letter topics, in order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.verdicts: list[Verdict] = []
        self.dead_letters: list[DeadLetter] = []
        ensure_topics(settings)  # the pipeline may not have created them yet
        self.consumer = make_consumer(settings, topics=None, group_id=None)
        read_from_beginning(self.consumer, [settings.topics.verdicts, settings.topics.dlq])

    def poll(self) -> None:
        for tp, records in self.consumer.poll(timeout_ms=200).items():
            for record in records:
                if tp.topic == self.settings.topics.verdicts:
                    self.verdicts.append(parse_verdict(record.value))
                else:
                    self.dead_letters.append(parse_dead_letter(record.value))

    def wait(self, verdicts: int, dead_letters: int = 0, timeout_s: float = 90.0) -> None:
        def enough() -> bool:
            self.poll()
            return len({v.event_id for v in self.verdicts}) >= verdicts and \
                len(self.dead_letters) >= dead_letters
        wait_for(enough, timeout_s, message=f"{verdicts} verdicts and {dead_letters} dead letters")

    def by_image(self) -> dict[str, Verdict]:
        return {v.image_id: v for v in self.verdicts}


@pytest.fixture
def start_pipeline(ray_cluster, make_settings) -> Iterator[Callable[..., tuple[Pipeline, Outputs]]]:
    started: list[Pipeline] = []

    def start(settings: Settings | None = None) -> tuple[Pipeline, Outputs]:
        settings = settings or make_settings()
        pipeline = Pipeline(settings, deploy_classifier=False).start()
        started.append(pipeline)
        return pipeline, Outputs(pipeline.settings)

    yield start
    for pipeline in started:
        if pipeline.ingest:
            pipeline.stop()


def wait_for(condition: Callable[[], object], timeout_s: float = 60.0, interval_s: float = 0.2,
             message: str = "condition") -> object:
    """Poll instead of sleeping a guessed time."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {message}")
        time.sleep(interval_s)
