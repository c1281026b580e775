"""The pipeline as a Ray Serve application, for KubeRay's RayService.

``serveConfigV2`` imports ``deploy.serve_app:app_builder`` with
``args: {config_file: ...}``. The application holds the Classifier and a
one-replica PipelineController that starts the dedup, kNN, review and ingest
actors and one metrics exporter per node; Serve restarts the controller if it
dies, and the actors' own restarts keep events flowing meanwhile.
"""

from __future__ import annotations

import os
from typing import Any

import ray
from ray import serve
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from common.config import load_settings
from workers.classifier import classifier_app
from workers.pipeline import Pipeline


@ray.remote(num_cpus=0, max_restarts=-1)
class NodeMetricsExporter:
    """Serves the summed metric files of its node on the metrics port."""

    def __init__(self, port: int) -> None:
        from common import metrics

        directory = os.environ.get(metrics.MULTIPROC_ENV) or metrics.prepare_multiprocess_dir()
        os.makedirs(directory, exist_ok=True)
        metrics.serve_metrics(port, path=directory)

    def ready(self) -> bool:
        return True


def start_exporters(port: int) -> list[Any]:
    """One exporter pinned to each live node (a node that joins later gets one on restart)."""
    exporters = [
        NodeMetricsExporter.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
        .remote(port)
        for node in ray.nodes() if node["Alive"]
    ]
    ray.get([exporter.ready.remote() for exporter in exporters])
    return exporters


@serve.deployment(name="PipelineController", num_replicas=1)
class PipelineController:
    def __init__(self, classifier: Any, config_file: str) -> None:
        self.classifier = classifier  # bound so the Classifier is part of this application
        settings = load_settings(config_file=config_file)
        self.exporters = start_exporters(settings.metrics_port) if settings.metrics_port else []
        self.pipeline = Pipeline(settings, deploy_classifier=False).start()

    def check_health(self) -> None:
        """Serve restarts the controller if the pipeline cannot report."""
        self.pipeline.stats()

    async def __call__(self, request: Any = None) -> dict[str, Any]:
        return self.pipeline.stats()

    def __del__(self) -> None:
        if getattr(self, "pipeline", None) is not None and self.pipeline.ingest:
            self.pipeline.stop()


def app_builder(args: dict[str, Any]) -> serve.Application:
    config_file = args.get("config_file") or os.environ.get("MODSTREAM_CONFIG", "")
    settings = load_settings(config_file=config_file or None)
    classifier = classifier_app(settings.bundle, settings.classifier, settings.pipeline.poll_records)
    return PipelineController.bind(classifier, config_file)
