"""``modstream bench --quick``: every suite runs and reports in the documented shape. The
speeds are not checked (quick sizes on a shared machine say nothing); the answers that must
hold at any size are: the dedup index agrees with the linear scan and the kNN index finds
the brute-force neighbours."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.bench.report import BenchError, Measure, Table, format_value
from deploy.cli import main

STATUSES = {"met", "NOT MET", "n/a"}


def _run(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    assert main(["bench", *argv, "--quick", "--json", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def _suite(document: dict, name: str) -> dict:
    return next(suite for suite in document["suites"] if suite["suite"] == name)


def _column(table: dict, column: str) -> list:
    return [row.get(column) for row in table["rows"]]


def _check_shape(suite: dict, printed: str) -> None:
    """Tables with rows, measures as median/min/max, goals with a status, all printed."""
    assert suite["tables"] and all(table["rows"] for table in suite["tables"])
    measures = [cell for table in suite["tables"] for row in table["rows"] for cell in row.values()
                if isinstance(cell, dict)]
    assert measures and all(cell["min"] <= cell["median"] <= cell["max"] for cell in measures)
    assert all(goal["status"] in STATUSES for goal in suite["goals"])
    assert f"== {suite['suite']} " in printed
    for table in suite["tables"]:
        assert table["title"] in printed


def test_tables_show_median_and_spread() -> None:
    table = Table("t", ("name", "value"))
    table.add(name="a", value=Measure.of([2.0, 1.0, 30.0], "ms"))
    assert table.render().splitlines()[-1].split() == ["a", "2.00", "(1.00-30.0)"]
    assert format_value(Measure.of([1234.5])) == "1,234"
    with pytest.raises(BenchError, match="no columns"):
        table.add(other=1)


def test_unknown_suite_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "nosuch", "--quick"]) == 2
    assert "unknown suite nosuch" in capsys.readouterr().err


def test_scaleout_refuses_a_ray_it_did_not_start(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The suite starts a two-node cluster itself, which cannot happen inside another Ray."""
    monkeypatch.setenv("MODSTREAM_RAY_ADDRESS", "ray://elsewhere:10001")
    assert main(["bench", "scaleout", "--quick"]) == 2
    assert "starts its own Ray" in capsys.readouterr().err


def test_scaleout_sizing_and_layout_goals() -> None:
    """The pure parts of the scaleout suite; the suite itself (three pipelines, a two-node cluster:
    minutes even at quick sizes) runs by hand: ``modstream bench scaleout --quick``."""
    from deploy.bench.cluster import BROKER, CNN_ROLE, DRIVER, RAY_DAEMONS
    from deploy.bench.scaleout import Placement, cores_needed, cpu_side_ms, layout_goals

    cpu = {"ingest actors": 1.0, RAY_DAEMONS: 0.5, CNN_ROLE: 9.0, BROKER: 9.0, DRIVER: 9.0}
    assert cpu_side_ms(cpu, 100) == 15.0  # ms per image: the CNN, broker and bench driver left out
    assert cpu_side_ms(cpu, 0) == 0.0
    assert cores_needed(1000, 15.0) == 15.0

    spread = [Placement("Ingest", "head", 1), Placement("Ingest", "worker", 2), Placement("DedupShard", "head", 3),
              Placement("DedupShard", "worker", 4), Placement("KnnReplica", "head", 5)]
    assert [goal.met for goal in layout_goals(spread, {1: 5, 2: 7})] == [True, True, True]
    packed = [Placement(place.actor, "head", place.pid) for place in spread]
    goals = layout_goals(packed, {1: 12, 2: 0})
    assert [goal.met for goal in goals] == [False, False, False]
    assert goals[0].measured == "head + head" and goals[2].measured == "12 + 0"


def test_quick_in_process_suites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    document, printed = _run(["knn", "dedup", "features"], tmp_path, capsys)
    assert [suite["suite"] for suite in document["suites"]] == ["knn", "dedup", "features"]
    assert document["machine"]["usable_cpus"] >= 1
    for suite in document["suites"]:
        _check_shape(suite, printed)

    knn = _suite(document, "knn")["tables"][0]
    assert _column(knn, "method")[1] == "brute force (numpy)"
    assert _column(knn, "recall@10")[0] >= 0.95
    dedup = _suite(document, "dedup")["tables"][0]
    assert set(_column(dedup, "hashes")) == {"random", "photos"}
    assert all(_column(dedup, "same answers"))
    assert 31 in _column(dedup, "max distance")  # the pipeline's default distance is always measured
    features = _suite(document, "features")["tables"][0]
    assert set(_column(features, "size")) == {"1024x768", "4000x3000"}


@pytest.mark.integration
def test_quick_ray_suites(ray_cluster, broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The configured bundle only: a second bundle adds ~25 s and no other shape.
    document, printed = _run(["classifier", "pipeline", "--classifier-bundles", "configured", "--bootstrap",
                              broker.bootstrap], tmp_path, capsys)
    for suite in document["suites"]:
        _check_shape(suite, printed)
    classifier = _suite(document, "classifier")["tables"][0]
    assert _column(classifier, "batch") == [1, 8]
    assert all(cell["median"] > 0 for cell in _column(classifier, "Serve img/s"))

    pipeline = _suite(document, "pipeline")
    throughput, latency, costs, by_process, memory = pipeline["tables"]
    assert len(throughput["rows"]) in (6, 7) and all(_column(throughput, "images/s"))  # 7: with (b')
    rounds = throughput["rows"][0]["images/s"]["samples"]  # --quick repeats twice, on fresh images each time
    assert len(rounds) == 2 and all(rate > 0 for rate in rounds)
    assert _column(latency, "events") == [12, 12, 12]  # every event got its verdict
    assert all(row["p50 ms"] <= row["p99 ms"] for row in latency["rows"])
    assert _column(costs, "stage")[-1] == "total"
    assert all(value > 0 for value in _column(memory, "MB"))
    processes = dict(zip(_column(by_process, "process"), _column(by_process, "unique: ms/image"), strict=True))
    assert processes["ingest actors"] > 0 and processes["classifier replicas"] > 0  # the run's own processes
    assert processes["  ingest: load threads (validate, fetch, features, decode requests)"] > 0
    assert _column(by_process, "process")[-2:] == ["pipeline total (own)",
                                                   "  of it, the idle rate over the unique phase"]
    idle = dict(zip(_column(by_process, "process"), _column(by_process, "idle: % of a core"), strict=True))
    assert idle["ingest actors"] > 0 and idle["pipeline total (own)"] >= idle["ingest actors"]
    assert len(pipeline["goals"]) == 6


def test_quick_kafkaclients_suite(broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Both clients (confluent-kafka comes with the dev extra) idle, produce and read everything back."""
    document, printed = _run(["kafkaclients", "--bootstrap", broker.bootstrap], tmp_path, capsys)
    suite = _suite(document, "kafkaclients")
    _check_shape(suite, printed)
    idle, traffic = suite["tables"]
    assert _column(idle, "client") == _column(traffic, "client") == ["kafka-python", "confluent-kafka (librdkafka)"]
    assert all(cell["median"] > 0 for cell in _column(traffic, "total"))
    assert _column(traffic, "total vs kafka-python")[0]["median"] == 1.0


def test_quick_compression_suite(broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every codec round-trips through the broker; the byte counts (exact, not timings) shrink."""
    document, printed = _run(["compression", "--bootstrap", broker.bootstrap], tmp_path, capsys)
    suite = _suite(document, "compression")
    _check_shape(suite, printed)
    table = suite["tables"][0]
    rows = {(row["workload"], row["codec"]): row for row in table["rows"]}
    assert set(rows) == {(workload, codec) for workload in ("verdicts", "dead letters")
                         for codec in ("none", "gzip", "snappy", "lz4", "zstd")}
    for (_, codec), row in rows.items():
        assert (row["vs none"] == 1.0) if codec == "none" else (row["vs none"] < 0.8), codec
