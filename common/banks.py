"""Hash banks: lists of known hashes (NCMEC, StopNCII, GIFCT, ThreatExchange or a
platform's own) that every upload is checked against before any model work.

A bank lives in the compacted topic ``<state_prefix>.banks``: one record per
entry, keyed ``bank|kind|hash`` (kind md5 or pdq), its value the label and
action a match gets and the list's own entry id; a tombstone (null value)
removes the entry. Dedup shards follow the topic (``BankFollower``), so an
import or a removal reaches running shards within seconds.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common.changelog import MARKER_PREFIX
from common.config import Settings
from common.dedupstate import BankEntryValue, BankIndex
from common.errors import ModstreamError
from common.features import pdq_to_int
from common.kafkaio import make_consumer, make_producer, publish_acknowledged, read_from_beginning

log = logging.getLogger(__name__)

BANK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
KINDS = ("md5", "pdq")
BANK_LABELS = ("adult", "normal")
BANK_ACTIONS = ("block", "review")
_MD5 = re.compile(r"^[0-9a-fA-F]{32}$")
_MAX_ENTRY_ID = 200
CSV_HEADER = ["kind", "hash", "label", "entry_id"]


class BankFileError(ModstreamError, ValueError):
    """A bank file that cannot be imported; the message names the line."""


def banks_topic(settings: Settings) -> str:
    return f"{settings.topics.state_prefix}.banks"


@dataclass(frozen=True)
class BankRow:
    kind: str
    hash: str
    label: str
    entry_id: str | None


def record_key(bank: str, kind: str, hash_hex: str) -> str:
    return f"{bank}|{kind}|{hash_hex}"


def parse_key(key: str) -> tuple[str, str, str] | None:
    parts = key.split("|")
    if len(parts) != 3 or not BANK_NAME.match(parts[0]) or parts[1] not in KINDS:
        return None
    return parts[0], parts[1], parts[2]


def check_bank_name(name: str) -> str:
    if not BANK_NAME.match(name):
        raise BankFileError(f"a bank name is 1-100 letters, digits, '.', '_' or '-', got {name!r}")
    return name


def read_bank_file(path: Path, default_label: str = "adult") -> list[BankRow]:
    """Rows of a JSON-lines or CSV bank file; the first bad line refuses the whole file.

    JSON lines: ``{"pdq": "64 hex"}`` or ``{"md5": "32 hex"}`` with optional "label" and
    "entry_id". CSV: the header ``kind,hash,label,entry_id`` (label and entry_id may be empty).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BankFileError(f"{path}: not UTF-8 ({exc})") from None
    except OSError as exc:
        raise BankFileError(f"{path}: {exc.strerror or exc}") from None
    first = next((line for line in text.splitlines() if line.strip()), "")
    rows = _read_json_lines(text, default_label) if first.lstrip().startswith("{") else _read_csv(text, default_label)
    if not rows:
        raise BankFileError(f"{path}: no entries")
    return rows


def _read_json_lines(text: str, default_label: str) -> list[BankRow]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise BankFileError(f"line {number}: not JSON ({exc})") from None
        if not isinstance(value, dict):
            raise BankFileError(f"line {number}: expected a JSON object")
        kinds = [kind for kind in KINDS if kind in value]
        if len(kinds) != 1:
            raise BankFileError(f"line {number}: exactly one of \"md5\" or \"pdq\" is required")
        rows.append(_row(number, kinds[0], value[kinds[0]], value.get("label"), value.get("entry_id"),
                         default_label))
    return rows


def _read_csv(text: str, default_label: str) -> list[BankRow]:
    reader = csv.reader(io.StringIO(text))
    rows: list[BankRow] = []
    header_seen = False
    try:
        for fields in reader:
            number = reader.line_num
            if not any(field.strip() for field in fields):
                continue
            if not header_seen:
                if [field.strip().lower() for field in fields][:2] != CSV_HEADER[:2]:
                    raise BankFileError(f"line {number}: expected the header {','.join(CSV_HEADER)} "
                                        "(or JSON lines)")
                header_seen = True
                continue
            if not 2 <= len(fields) <= 4:
                raise BankFileError(f"line {number}: expected 2-4 fields ({','.join(CSV_HEADER)}), got {len(fields)}")
            kind, hash_value, label, entry_id = [*fields, "", ""][:4]
            rows.append(_row(number, kind.strip().lower(), hash_value.strip(), label.strip() or None,
                             entry_id.strip() or None, default_label))
    except csv.Error as exc:
        raise BankFileError(f"line {reader.line_num}: {exc}") from None
    return rows


def _row(number: int, kind: str, hash_value: object, label: object, entry_id: object, default_label: str) -> BankRow:
    if kind not in KINDS:
        raise BankFileError(f"line {number}: kind must be md5 or pdq, got {kind!r}")
    if not isinstance(hash_value, str):
        raise BankFileError(f"line {number}: the hash must be a string")
    if kind == "md5" and not _MD5.match(hash_value):
        raise BankFileError(f"line {number}: an md5 is 32 hex digits, got {hash_value[:80]!r}")
    if kind == "pdq":
        try:
            pdq_to_int(hash_value)
        except ValueError as exc:
            raise BankFileError(f"line {number}: {exc}") from None
    label = default_label if label is None else label
    if label not in BANK_LABELS:
        raise BankFileError(f"line {number}: label must be one of {', '.join(BANK_LABELS)}, got {label!r}")
    if entry_id is not None and (not isinstance(entry_id, str) or not entry_id or len(entry_id) > _MAX_ENTRY_ID):
        raise BankFileError(f"line {number}: entry_id must be a non-empty string of at most {_MAX_ENTRY_ID} characters")
    return BankRow(kind, hash_value.lower(), str(label), entry_id)


def import_rows(settings: Settings, bank: str, rows: list[BankRow], action: str, timeout_s: float = 60.0) -> int:
    """Write a bank's entries to the bank topic and wait for the broker's acknowledgement."""
    check_bank_name(bank)
    if action not in BANK_ACTIONS:
        raise BankFileError(f"action must be one of {', '.join(BANK_ACTIONS)}, got {action!r}")
    return publish_acknowledged(
        settings, banks_topic(settings),
        ((record_key(bank, row.kind, row.hash),
          json.dumps({"label": row.label, "action": action, "entry_id": row.entry_id}).encode()) for row in rows),
        timeout_s)


def read_banks(settings: Settings, timeout_s: float = 60.0) -> BankIndex:
    """Every bank as it stands now (the topic replayed up to markers)."""
    index = BankIndex(max_distance=0)
    for key, value in _replay(settings, timeout_s):
        apply_bank_record(index, key, value)
    return index


def remove_bank(settings: Settings, bank: str, timeout_s: float = 60.0) -> int:
    """Tombstone every entry of a bank; returns how many."""
    check_bank_name(bank)
    keys = [record_key(name, kind, hash_hex) for name, kind, hash_hex in read_banks(settings, timeout_s).entries
            if name == bank]
    return publish_acknowledged(settings, banks_topic(settings), ((key, None) for key in keys), timeout_s)


def apply_bank_record(index: BankIndex, key: str, value: bytes | None) -> None:
    """Apply one record of the bank topic; a malformed one is logged and skipped (producers are not trusted)."""
    parsed = parse_key(key)
    if parsed is None:
        log.warning("ignoring bank record with a malformed key %r", key[:200])
        return
    bank, kind, hash_hex = parsed
    if value is None:
        index.put(bank, kind, hash_hex, None)
        return
    try:
        document = json.loads(value)
        entry = BankEntryValue(label=document["label"], action=document["action"], entry_id=document.get("entry_id"))
        if entry.label not in BANK_LABELS or entry.action not in BANK_ACTIONS:
            raise ValueError(f"label {entry.label!r} / action {entry.action!r}")
        if kind == "pdq":
            pdq_to_int(hash_hex)
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring malformed bank record %r: %s", key[:200], exc)
        return
    index.put(bank, kind, hash_hex, entry)


def _replay(settings: Settings, timeout_s: float) -> Iterator[tuple[str, bytes | None]]:
    """The bank topic from its start up to now, tombstones included (they remove entries)."""
    follower = _Reader(settings)
    try:
        yield from follower.until_marker(timeout_s)
    finally:
        follower.close()


class _Reader:
    """A group-less reader of the whole bank topic that knows when it has caught up."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = banks_topic(settings)
        self.consumer = make_consumer(settings, topics=None, group_id=None,
                                      fetch_max_wait_ms=settings.kafka.follower_fetch_max_wait_ms)
        self.partitions = read_from_beginning(self.consumer, [self.topic])

    def until_marker(self, timeout_s: float) -> Iterator[tuple[str, bytes | None]]:
        marker = MARKER_PREFIX + uuid.uuid4().hex
        producer = make_producer(self.settings)
        try:
            for tp in self.partitions:
                producer.send(self.topic, key=marker, value=None, partition=tp.partition)
            producer.flush(timeout=timeout_s)
        finally:
            producer.close()
        pending = {tp.partition for tp in self.partitions}
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise ModstreamError(f"reading {self.topic} did not reach its markers in {timeout_s}s")
            for tp, records in self.consumer.poll(timeout_ms=200).items():
                for record in records:
                    key = record.key.decode(errors="replace") if record.key else ""
                    if key == marker:
                        pending.discard(tp.partition)
                    elif not key.startswith(MARKER_PREFIX):
                        yield key, record.value

    def poll(self) -> Iterator[tuple[str, bytes | None]]:
        for records in self.consumer.poll(timeout_ms=500).values():
            for record in records:
                key = record.key.decode(errors="replace") if record.key else ""
                if not key.startswith(MARKER_PREFIX):
                    yield key, record.value

    def close(self) -> None:
        self.consumer.close()


class BankFollower:
    """Keeps a BankIndex equal to the bank topic: caught up before it returns, then tailed
    by a daemon thread, so imports and removals reach a running shard within about a second."""

    def __init__(self, settings: Settings, max_distance: int, timeout_s: float = 120.0) -> None:
        self.lock = threading.Lock()
        self.index = BankIndex(max_distance)
        self.stopping = threading.Event()
        self.errors = 0
        self._reader = _Reader(settings)
        for key, value in self._reader.until_marker(timeout_s):
            apply_bank_record(self.index, key, value)
        self.thread = threading.Thread(target=self._tail, name="banks", daemon=True)
        self.thread.start()

    def _tail(self) -> None:
        while not self.stopping.is_set():
            try:
                for key, value in self._reader.poll():
                    with self.lock:
                        apply_bank_record(self.index, key, value)
            except Exception:  # the broker is away: keep the banks we have and try again
                self.errors += 1
                log.exception("following the bank topic failed; retrying")
                self.stopping.wait(1.0)
        self._reader.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)
