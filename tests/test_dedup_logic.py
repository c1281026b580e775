"""Which verdict an image reuses: dedup state, banks, retention and batch rules as pure logic."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from common.decisions import batch_copies, decide_from_match, decide_from_model, variants
from common.dedupstate import (
    BankEntryValue,
    BankIndex,
    DedupState,
    Entry,
    ImageRecord,
    Match,
    bank_match,
    digest64,
    match_rank,
    reviewed_entry,
    shard_of,
)
from common.features import ImageFeatures, pdq_hex_of_int
from common.fusion import FusionTree, Thresholds
from common.messages import UploadEvent

A = "a" * 32
B = "b" * 32
BASE = int("5a" * 32, 16)  # a 256-bit hash with 128 bits set


def near(bits: int, base: int = BASE) -> int:
    """base with its lowest ``bits`` bits flipped."""
    return base ^ ((1 << bits) - 1)


def entry(md5: str, pdq: int, image_id: str, event_id: str = "e0", quality: int = 100) -> Entry:
    return Entry(md5=md5, pdq=pdq_hex_of_int(pdq), pdq_quality=quality, image_id=image_id,
                 event_key=digest64(event_id), action="allow", label="normal", score=0.1,
                 signals={"knn": None, "cnn": 0.1})


def features(md5: str, pdq: int, quality: int = 100) -> ImageFeatures:
    return ImageFeatures(md5=md5, pdq=pdq_hex_of_int(pdq), pdq_quality=quality, pdq_variants=(pdq,) * 8,
                         phash="0" * 16, histogram=np.zeros(64, np.float32), cnn_input=np.zeros((2, 2, 3), np.uint8),
                         width=10, height=10)


def event(event_id: str, image_id: str) -> UploadEvent:
    return UploadEvent(event_id=event_id, image_id=image_id, uri="file:///x.jpg")


def test_exact_beats_near_and_near_needs_quality_on_both_sides() -> None:
    state = DedupState(max_distance=31)
    state.remember(entry(A, BASE, "img-a"))
    assert state.lookup(A, (near(100),), 100).kind == "exact"
    found = state.lookup(B, (near(31),), 100)
    assert (found.kind, found.entry.image_id, found.distance) == ("near", "img-a", 31)
    assert state.lookup(B, (near(31),), 49) is None  # a low-quality query is never near-matched
    assert state.lookup(B, (near(32),), 100) is None
    state.remember(entry(B, near(200), "img-low", quality=20))
    assert state.lookup("c" * 32, (near(201),), 100) is None  # nor is a low-quality stored hash


def test_entries_round_trip_through_the_compact_columns() -> None:
    state = DedupState(max_distance=31)
    original = replace(entry(A, BASE, "img-ä" * 3, event_id="e7"), model_version="bundle-1", added_s=12.5)
    state.remember(original)
    assert state.get(A) == original
    assert state.get(B) is None
    assert state.get("b" * 16 + "a" * 16) is None  # same 64-bit table key, another MD5


def test_a_reviewed_near_duplicate_beats_an_unreviewed_exact_match() -> None:
    state = DedupState(max_distance=31)
    state.remember(entry(A, BASE, "img-a"))
    state.remember(reviewed_entry(entry(B, near(5), "img-b"), "adult"), keep_reviewed=False)
    match = state.lookup(A, (BASE,), 100)
    assert (match.kind, match.entry.image_id, match.entry.action) == ("near", "img-b", "block")


def test_a_model_verdict_never_overwrites_a_review() -> None:
    state = DedupState(max_distance=31)
    state.remember(reviewed_entry(entry(A, BASE, "img-a"), "adult"), keep_reviewed=False)
    kept = state.remember(entry(A, BASE, "img-a", event_id="e9"))
    assert kept.reviewed and kept.action == "block"


def test_review_of_an_unseen_image_id_applies_when_it_arrives() -> None:
    state = DedupState(max_distance=31)
    state.review_image_id("img-later", "adult")
    match = state.lookup(None, (), 0, image_id="img-later")
    assert (match.kind, match.entry.action, match.entry.label) == ("image_review", "block", "adult")


def test_dihedral_variants_find_a_rotated_copy() -> None:
    state = DedupState(max_distance=31)
    state.remember(entry(A, BASE, "img-a"))
    rotated = replace(features(B, near(120)), pdq_variants=(near(120), 7, near(3), 9, 1, 2, 3, 4))
    assert state.lookup(B, variants(rotated, dihedral=False), 100) is None
    assert state.lookup(B, variants(rotated, dihedral=True), 100).distance == 3


def test_retention_evicts_the_oldest_unreviewed_first() -> None:
    clock = iter(range(1, 1000))
    rng = np.random.default_rng(3)
    hashes = [int.from_bytes(rng.bytes(32), "big") for _ in range(30)]
    state = DedupState(max_distance=31, max_images=10, clock=lambda: float(next(clock)))
    state.remember(reviewed_entry(entry("0" * 32, hashes[0], "img-reviewed"), "adult"), keep_reviewed=False)
    for i in range(1, 30):
        state.remember(entry(f"{i:032x}", hashes[i], f"img-{i}"))
        state.remember_image(ImageRecord(f"img-{i}", f"{i:032x}", pdq_hex_of_int(i), 100, [0] * 64))
    assert len(state) <= 10 and state.image_count() <= 10
    assert state.get("0" * 32).reviewed  # the oldest, but reviewed
    assert state.get(f"{1:032x}") is None and state.get(f"{29:032x}") is not None
    assert state.lookup(None, (near(2, hashes[29]),), 100).entry.image_id == "img-29"  # index rebuilt
    assert state.lookup(None, (hashes[1],), 100) is None
    assert state.image("img-1") is None and state.image("img-29").md5 == f"{29:032x}"
    assert state.evicted > 0


def test_memory_per_remembered_verdict_is_bounded() -> None:
    state = DedupState(max_distance=31)
    rng = np.random.default_rng(0)
    count = 40_000
    for i in range(count):
        state.remember(entry(f"{i:032x}", int.from_bytes(rng.bytes(32), "big"), f"img-{i:08d}"))
    assert state.nbytes / count < 400  # array capacity doubles, so up to 2x the ~190 bytes in use


def test_bank_hits_rank_above_remembered_verdicts_and_below_reviews() -> None:
    banks = BankIndex(max_distance=31)
    banks.put("ncmec", "pdq", pdq_hex_of_int(near(4)), BankEntryValue("adult", "block", "e-1"))
    banks.put("own", "md5", A, BankEntryValue("adult", "review", None))
    hit = bank_match(B, (BASE,), 100, banks)
    assert (hit.kind, hit.bank.name, hit.bank.entry_id, hit.distance, hit.entry.action) == (
        "bank", "ncmec", "e-1", 4, "block")
    assert bank_match(B, (BASE,), 10, banks) is None  # low quality: no PDQ bank match
    assert bank_match(A, (), 0, banks).bank.name == "own"
    remembered = Match("exact", entry(B, BASE, "img-b"), 0)
    reviewed = Match("near", reviewed_entry(entry(B, BASE, "img-b"), "normal"), 9)
    assert sorted([remembered, hit, reviewed], key=match_rank) == [reviewed, hit, remembered]
    banks.put("ncmec", "pdq", pdq_hex_of_int(near(4)), None)
    assert bank_match(B, (BASE,), 100, banks) is None
    banks.remove_bank("own")
    assert bank_match(A, (), 0, banks) is None


def test_replay_of_the_event_that_made_an_entry_gets_the_model_verdict_back() -> None:
    remembered = entry(A, BASE, "img-a", event_id="e1")
    replay = decide_from_match(event("e1", "img-a"), Match("exact", remembered, 0))
    assert (replay.source, replay.matched_image_id, replay.signals["cnn"]) == ("model", None, 0.1)
    copy = decide_from_match(event("e2", "img-copy"), Match("exact", remembered, 0))
    assert (copy.source, copy.matched_image_id, copy.signals["pdq_distance"]) == ("exact_duplicate", "img-a", 0)
    found = decide_from_match(event("e3", "img-near"), Match("near", remembered, 3))
    assert (found.source, found.signals["pdq_distance"]) == ("near_duplicate", 3)
    reviewed = decide_from_match(event("e4", "x"), Match("near", reviewed_entry(remembered, "adult"), 2))
    assert (reviewed.source, reviewed.action) == ("review_cache", "block")


def test_a_remembered_verdict_keeps_the_bundle_that_made_it() -> None:
    remembered = replace(entry(A, BASE, "img-a", event_id="e1"), model_version="bundle-old")
    assert decide_from_match(event("e1", "img-a"), Match("exact", remembered, 0)).model_version == "bundle-old"
    assert decide_from_match(event("e2", "b"), Match("near", remembered, 1)).model_version == "bundle-old"


def test_copies_inside_one_batch_point_at_their_first_occurrence() -> None:
    batch = [features(A, BASE), features(B, near(31)), features(A, BASE),
             features("c" * 32, near(3), quality=40), features("d" * 32, near(32))]
    copies = batch_copies(batch, max_distance=31)
    assert set(copies) == {1, 2}
    assert (copies[1].leader, copies[1].distance, copies[1].exact) == (0, 31, False)
    assert (copies[2].leader, copies[2].distance, copies[2].exact) == (0, 0, True)


def test_model_decision_uses_the_tree_and_thresholds() -> None:
    tree = FusionTree.rule_tree(knn_min=0.5, cnn_min=0.5)
    blocked = decide_from_model(None, 0.97, tree, Thresholds(block=0.9, review=0.5))
    assert (blocked.action, blocked.label, blocked.source) == ("block", "adult", "model")
    allowed = decide_from_model(0.9, 0.2, tree, Thresholds())
    assert (allowed.action, allowed.label) == ("allow", "normal")


def test_shards_are_stable_and_spread() -> None:
    keys = [f"img-{i}" for i in range(1000)]
    assert [shard_of(k, 4) for k in keys] == [shard_of(k, 4) for k in keys]
    counts = np.bincount([shard_of(k, 4) for k in keys], minlength=4)
    assert counts.min() > 200


def test_bulk_load_of_changelog_records_equals_applying_them_one_by_one() -> None:
    rng = np.random.default_rng(5)
    hashes = [int.from_bytes(rng.bytes(32), "big") for _ in range(40)]
    entries = [entry(f"{i % 30:032x}", hashes[i % 30], f"img-{i}", event_id=f"e{i}") for i in range(40)]
    entries[35] = reviewed_entry(entries[35], "adult")  # a later review of key 5 wins
    images = [ImageRecord(f"img-{i % 25}", f"{i:032x}", pdq_hex_of_int(hashes[i]), 100, [i % 7] * 64)
              for i in range(40)]
    one_by_one, bulk = DedupState(max_distance=31), DedupState(max_distance=31)
    for record in entries:
        one_by_one.remember(record, keep_reviewed=False)
    for image in images:
        one_by_one.remember_image(image)
    bulk.load(entries[:20], images[:20])
    bulk.load(entries[20:], images[20:])  # a second chunk updates keys of the first
    for i in range(30):
        assert replace(bulk.get(f"{i:032x}"), added_s=0) == replace(one_by_one.get(f"{i:032x}"), added_s=0)
    for i in range(25):
        assert bulk.image(f"img-{i}") == one_by_one.image(f"img-{i}")
    assert bulk.lookup(None, (near(4, hashes[5]),), 100).entry.reviewed
