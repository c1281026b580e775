"""Hash banks: file parsing (hostile files refused with their line number), and, through
the real pipeline, import, live update, removal and precedence (review > bank >
remembered verdict > model); plus shard-local restore of dedup state."""

from __future__ import annotations

import base64
import io
import json
import uuid
from pathlib import Path

import pytest
import ray
from PIL import Image

from common.banks import BankFileError, BankRow, apply_bank_record, import_rows, read_bank_file, read_banks
from common.changelog import Changelog
from common.dedupstate import BankIndex
from common.features import extract_features, md5_hex
from common.messages import ReviewDecision, UploadEvent
from deploy.cli import main
from deploy.clients import publish_events, publish_review, upload_event_for
from tests.conftest import wait_for
from workers.dedup import dedup_topic, owns_partition

SAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "samples"
PDQ = "ab" * 32
MD5 = "0123456789abcdef" * 2


def _write(tmp_path: Path, text: str, name: str = "bank.txt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- bank files ---------------------------------------------------------------------


def test_json_lines_and_csv_are_read_with_defaults(tmp_path: Path) -> None:
    lines = f'{{"pdq": "{PDQ.upper()}", "entry_id": "e-1"}}\n\n{{"md5": "{MD5}", "label": "normal"}}\n'
    assert read_bank_file(_write(tmp_path, lines)) == [BankRow("pdq", PDQ, "adult", "e-1"),
                                                       BankRow("md5", MD5, "normal", None)]
    table = f"kind,hash,label,entry_id\npdq,{PDQ},,e-2\nmd5,{MD5},adult,\n"
    assert read_bank_file(_write(tmp_path, table, "bank.csv"), default_label="normal") == [
        BankRow("pdq", PDQ, "normal", "e-2"), BankRow("md5", MD5, "adult", None)]


@pytest.mark.parametrize(("text", "line", "reason"), [
    (f'{{"pdq": "{PDQ}"}}\n{{"pdq": "{PDQ[:-1]}"}}\n', 2, "64 hex digits"),
    (f'{{"pdq": "{PDQ}"}}\nnot json\n', 2, "not JSON"),
    (f'{{"pdq": "{PDQ}", "md5": "{MD5}"}}\n', 1, "exactly one"),
    (f'{{"md5": "{MD5}"}}\n[1, 2]\n', 2, "JSON object"),
    (f'{{"md5": "{MD5}", "label": "nsfw"}}\n', 1, "label"),
    (f'{{"md5": "{MD5}", "entry_id": 7}}\n', 1, "entry_id"),
    ('{"md5": 12}\n', 1, "string"),
    ("kind,hash,label,entry_id\nmd5,xyz,,\n", 2, "32 hex digits"),
    ("kind,hash,label,entry_id\n\nsha1,abc,,\n", 3, "md5 or pdq"),
    (f"kind,hash,label,entry_id\nmd5,{MD5},adult,e,extra\n", 2, "2-4 fields"),
    (f"hash,kind\n{MD5},md5\n", 1, "header"),
])
def test_malformed_bank_files_are_refused_with_the_line_number(tmp_path: Path, text: str, line: int,
                                                               reason: str) -> None:
    with pytest.raises(BankFileError, match=rf"line {line}: .*{reason}"):
        read_bank_file(_write(tmp_path, text))


def test_empty_and_binary_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BankFileError, match="no entries"):
        read_bank_file(_write(tmp_path, "\n\n"))
    binary = tmp_path / "bank.bin"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BankFileError, match="not UTF-8"):
        read_bank_file(binary)
    with pytest.raises(BankFileError):
        read_bank_file(tmp_path / "missing.csv")


def test_cli_refuses_a_malformed_file_before_touching_kafka(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path, f'{{"md5": "{MD5}"}}\n{{"pdq": "zz"}}\n')
    assert main(["bank", "import", str(path), "--bank", "own"]) == 2
    assert "line 2" in capsys.readouterr().err
    assert main(["bank", "import", str(path), "--bank", "bad name"]) == 2


@pytest.mark.parametrize(("key", "value"), [
    ("no-separators", b'{"label": "adult", "action": "block"}'),
    ("bank|sha1|abc", b'{"label": "adult", "action": "block"}'),
    (f"bad name|md5|{MD5}", b'{"label": "adult", "action": "block"}'),
    (f"list|pdq|{PDQ[:10]}", b'{"label": "adult", "action": "block"}'),
    (f"list|md5|{MD5}", b"not json"),
    (f"list|md5|{MD5}", b"\xff\xfe"),
    (f"list|md5|{MD5}", b"[1, 2]"),
    (f"list|md5|{MD5}", b'{"label": "adult"}'),
    (f"list|md5|{MD5}", b'{"label": "weird", "action": "block"}'),
])
def test_hostile_bank_records_are_skipped_not_fatal(key: str, value: bytes) -> None:
    index = BankIndex(max_distance=31)
    apply_bank_record(index, key, value)
    assert index.entries == {}
    apply_bank_record(index, f"list|md5|{MD5}", b'{"label": "adult", "action": "review", "entry_id": "x"}')
    assert index.lookup(MD5, (), 0)[1].action == "review"
    apply_bank_record(index, f"list|md5|{MD5}", None)  # a tombstone removes it
    assert index.lookup(MD5, (), 0) is None


# --- through the pipeline -------------------------------------------------------------


def _features(path: Path):
    image = Image.open(path).convert("RGB")
    return extract_features(path.read_bytes(), image, image.size)


def _half_size_event(path: Path, image_id: str) -> UploadEvent:
    image = Image.open(path)
    buffer = io.BytesIO()
    image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS).save(buffer, "JPEG", quality=90)
    return UploadEvent(event_id=str(uuid.uuid4()), image_id=image_id,
                       data_b64=base64.b64encode(buffer.getvalue()).decode())


def _config(tmp_path: Path, settings) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"kafka": {"bootstrap": settings.kafka.bootstrap},
                                "topics": {"state_prefix": settings.topics.state_prefix, "partitions": 2}}))
    return path


@pytest.mark.integration
def test_banks_update_live_and_rank_between_reviews_and_remembered_verdicts(start_pipeline, tmp_path, capsys) -> None:
    pipeline, outputs = start_pipeline()
    settings = pipeline.settings
    remembered, banked = SAMPLES / "camera.jpg", SAMPLES / "coffee.jpg"
    publish_events(settings, [upload_event_for(remembered, inline=False)])
    outputs.wait(1)
    assert outputs.by_image()["camera"].source == "model"

    # Import through the CLI while the shards run: a PDQ entry and the MD5 of an image already remembered.
    bank_file = _write(tmp_path, json.dumps({"pdq": _features(banked).pdq, "entry_id": "e-42"}) + "\n"
                       + json.dumps({"md5": md5_hex(remembered.read_bytes()), "entry_id": "e-7"}) + "\n")
    config = _config(tmp_path, settings)
    assert main(["bank", "import", str(bank_file), "--bank", "test-list", "--config", str(config)]) == 0
    wait_for(lambda: all(ray.get(shard.stats.remote())["banks"].get("test-list") == 2 for shard in pipeline.shards),
             timeout_s=30, message="bank reached every shard")
    assert main(["bank", "list", "--config", str(config)]) == 0
    assert "test-list\t2 entries" in capsys.readouterr().out

    publish_events(settings, [_half_size_event(banked, "banked-copy"),
                              upload_event_for(remembered, inline=False, image_id="remembered-again")])
    outputs.wait(3)
    verdicts = outputs.by_image()
    copy = verdicts["banked-copy"]
    assert (copy.source, copy.action, copy.label, copy.bank.name, copy.bank.entry_id) == \
        ("hash_bank", "block", "adult", "test-list", "e-42")
    assert 0 < copy.signals.pdq_distance <= 31 and copy.signals.cnn is None
    again = verdicts["remembered-again"]  # the bank wins over the remembered model verdict
    assert (again.source, again.bank.entry_id, again.signals.pdq_distance) == ("hash_bank", "e-7", 0)

    # A review wins over the bank.
    publish_review(settings, ReviewDecision(image_id="camera", label="normal", reviewer="test"))
    wait_for(lambda: pipeline.stats().get("reviews_applied", 0) >= 1, message="review applied")
    publish_events(settings, [upload_event_for(remembered, inline=False, image_id="reviewed-again")])
    outputs.wait(4)
    reviewed = outputs.by_image()["reviewed-again"]
    assert (reviewed.source, reviewed.action, reviewed.bank) == ("review_cache", "allow", None)

    # Removal reaches the running shards too.
    assert main(["bank", "remove", "test-list", "--config", str(config)]) == 0
    wait_for(lambda: not any(ray.get(shard.stats.remote())["banks"] for shard in pipeline.shards),
             timeout_s=30, message="bank removed from every shard")
    assert read_banks(settings).names() == {}
    publish_events(settings, [_half_size_event(banked, "after-removal")])
    outputs.wait(5)
    assert outputs.by_image()["after-removal"].source == "model"


@pytest.mark.integration
def test_restore_after_restart_reads_only_each_shards_share(start_pipeline, make_settings, tmp_path) -> None:
    settings = make_settings(pipeline={"dedup_shards": 2})
    first, outputs = start_pipeline(settings)
    originals = [SAMPLES / f"{name}.jpg" for name in ("astronaut", "camera", "cat", "coffee", "retina",
                                                       "rocket")]
    publish_events(settings, [upload_event_for(path, inline=False) for path in originals])
    outputs.wait(len(originals))
    import_rows(settings, "restart-list", [BankRow("md5", MD5, "adult", None)], "review")
    first.stop()

    changelog = Changelog(settings, dedup_topic(settings))
    total = sum(1 for _ in changelog.replay())
    per_shard = [sum(1 for _ in changelog.replay(only=owns_partition(shard, 2))) for shard in range(2)]
    assert sum(per_shard) == total and all(0 < count < total for count in per_shard)

    second, outputs = start_pipeline(settings)
    stats = ray.get([shard.stats.remote() for shard in second.shards])
    assert [s["restored_records"] for s in stats] == per_shard  # each read only its own partition
    assert sum(s["entries"] for s in stats) == len(originals)
    assert all(s["banks"] == {"restart-list": 1} for s in stats)
    publish_events(settings, [_half_size_event(path, f"{path.stem}-small") for path in originals[:3]])
    outputs.wait(len(originals) + 3)
    for path in originals[:3]:
        verdict = outputs.by_image()[f"{path.stem}-small"]
        assert (verdict.source, verdict.matched_image_id) == ("near_duplicate", path.stem)
