"""Scale-out: the pipeline on a two-node local Ray cluster, actors on both nodes.

A process can hold one Ray connection and the session already has one, so
the cluster runs in a child process (this file run as a script) that reports
what it saw as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from deploy.clients import publish_events
from tests.conftest import Outputs
from tests.test_faults import workload

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def run_on_two_nodes(config_file: str, expected: int) -> dict:
    """Child process: start a 2-node cluster, run the pipeline until ``expected`` verdicts, report placement."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from common.config import load_settings
    from workers.pipeline import Pipeline

    settings = load_settings(config_file=config_file, env={})
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        deadline = time.monotonic() + 60
        while len([node for node in ray.nodes() if node["Alive"]]) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)  # placement reads the live nodes: both must be registered first
        pipeline = Pipeline(settings).start()
        print("started", flush=True)  # the parent publishes now
        deadline = time.monotonic() + 240
        while pipeline.stats().get("verdicts", 0) < expected and time.monotonic() < deadline:
            time.sleep(0.5)
        actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
        placement = {}
        for actor in actors:
            placement.setdefault(actor.class_name, set()).add(actor.node_id)
        totals = pipeline.stop()
        return {"nodes": len([n for n in ray.nodes() if n["Alive"]]),
                "placement": {name: sorted(nodes) for name, nodes in placement.items()},
                "verdicts": totals.get("verdicts", 0)}
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_pipeline_runs_on_two_nodes_with_actors_on_both(make_settings, modstream_home, tmp_path) -> None:
    settings = make_settings(pipeline={"ingest_actors": 2, "dedup_shards": 2, "knn_replicas": 2,
                                       "poll_records": 8})
    config = tmp_path / "modstream.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    events = workload(16, 4, seed=500)
    env = {**os.environ, "MODSTREAM_HOME": str(modstream_home), "RAY_ADDRESS": ""}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    child = subprocess.Popen([sys.executable, "-m", "tests.test_scale_out", str(config), str(len(events))],
                             env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "started", child.stderr.read()[-3000:]
        publish_events(settings, events)
        outputs = Outputs(settings)
        outputs.wait(len(events), timeout_s=180)
        report_line, errors = child.communicate(timeout=180)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, errors[-3000:]
    report = json.loads(report_line.strip().splitlines()[-1])
    assert report["nodes"] == 2
    placement = report["placement"]
    used_nodes = set().union(*map(set, placement.values()))
    assert len(used_nodes) == 2, placement
    assert len(placement["Ingest"]) == 2 and len(placement["DedupShard"]) == 2, placement
    assert report["verdicts"] == len(events)
    assert {v.event_id for v in outputs.verdicts} == {e.event_id for e in events}


if __name__ == "__main__":
    print(json.dumps(run_on_two_nodes(sys.argv[1], int(sys.argv[2]))), flush=True)
