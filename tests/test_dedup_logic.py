"""Which verdict an image reuses: dedup state and batch rules as pure logic."""

from __future__ import annotations

import numpy as np

from common.decisions import batch_copies, decide_from_match, decide_from_model
from common.dedupstate import DedupState, Entry, Match, reviewed_entry, shard_of
from common.features import ImageFeatures
from common.fusion import FusionTree, Thresholds
from common.messages import UploadEvent


def entry(md5: str, phash: str, image_id: str, event_id: str = "e0", reliable: bool = True) -> Entry:
    return Entry(md5=md5, phash=phash, phash_reliable=reliable, image_id=image_id, event_id=event_id,
                 action="allow", label="normal", score=0.1, signals={"knn": None, "cnn": 0.1, "hamming": None})


def features(md5: str, phash: str, reliable: bool = True) -> ImageFeatures:
    return ImageFeatures(md5=md5, phash=phash, phash_quality=0.9 if reliable else 0.1, phash_reliable=reliable,
                         histogram=np.zeros(64, np.float32), cnn_input=np.zeros((2, 2, 3), np.uint8),
                         width=10, height=10)


def event(event_id: str, image_id: str) -> UploadEvent:
    return UploadEvent(event_id=event_id, image_id=image_id, uri="file:///x.jpg")


A = "a" * 32
B = "b" * 32


def test_exact_beats_near_and_near_needs_a_reliable_hash() -> None:
    state = DedupState(max_distance=4)
    state.remember(entry(A, "00000000000000ff", "img-a"))
    assert state.lookup(A, "ffffffffffffffff", True).kind == "exact"
    near = state.lookup(B, "00000000000000fe", True)
    assert (near.kind, near.entry.image_id, near.distance) == ("near", "img-a", 1)
    assert state.lookup(B, "00000000000000fe", False) is None  # flat image: no near matching
    assert state.lookup(B, "0000000000000f00", True) is None  # 8 bits away


def test_a_reviewed_near_duplicate_beats_an_unreviewed_exact_match() -> None:
    state = DedupState(max_distance=4)
    state.remember(entry(A, "00000000000000ff", "img-a"))
    state.remember(reviewed_entry(entry(B, "00000000000000fe", "img-b"), "adult"), keep_reviewed=False)
    match = state.lookup(A, "00000000000000ff", True)
    assert (match.kind, match.entry.image_id, match.entry.action) == ("near", "img-b", "block")


def test_a_model_verdict_never_overwrites_a_review() -> None:
    state = DedupState(max_distance=4)
    state.remember(reviewed_entry(entry(A, "00000000000000ff", "img-a"), "adult"), keep_reviewed=False)
    kept = state.remember(entry(A, "00000000000000ff", "img-a", event_id="e9"))
    assert kept.reviewed and kept.action == "block"


def test_review_of_an_unseen_image_id_applies_when_it_arrives() -> None:
    state = DedupState(max_distance=4)
    state.review_image_id("img-later", "adult")
    match = state.lookup(A, "00000000000000ff", True, image_id="img-later")
    assert (match.kind, match.entry.action, match.entry.label) == ("image_review", "block", "adult")


def test_replay_of_the_event_that_made_an_entry_gets_the_model_verdict_back() -> None:
    remembered = entry(A, "00000000000000ff", "img-a", event_id="e1")
    replay = decide_from_match(event("e1", "img-a"), Match("exact", remembered, 0))
    assert (replay.source, replay.matched_image_id, replay.signals["cnn"]) == ("model", None, 0.1)
    copy = decide_from_match(event("e2", "img-copy"), Match("exact", remembered, 0))
    assert (copy.source, copy.matched_image_id, copy.signals["hamming"]) == ("exact_duplicate", "img-a", 0)
    near = decide_from_match(event("e3", "img-near"), Match("near", remembered, 3))
    assert (near.source, near.signals["hamming"]) == ("near_duplicate", 3)
    reviewed = decide_from_match(event("e4", "x"), Match("near", reviewed_entry(remembered, "adult"), 2))
    assert (reviewed.source, reviewed.action) == ("review_cache", "block")


def test_a_remembered_verdict_keeps_the_bundle_that_made_it() -> None:
    from dataclasses import replace

    remembered = replace(entry(A, "00000000000000ff", "img-a", event_id="e1"), model_version="bundle-old")
    assert decide_from_match(event("e1", "img-a"), Match("exact", remembered, 0)).model_version == "bundle-old"
    assert decide_from_match(event("e2", "b"), Match("near", remembered, 1)).model_version == "bundle-old"


def test_copies_inside_one_batch_point_at_their_first_occurrence() -> None:
    batch = [features(A, "00000000000000ff"), features(B, "00000000000000fe"), features(A, "00000000000000ff"),
             features("c" * 32, "00000000000000fe", reliable=False), features("d" * 32, "ff00000000000000")]
    copies = batch_copies(batch, max_distance=4)
    assert set(copies) == {1, 2}
    assert (copies[1].leader, copies[1].distance, copies[1].exact) == (0, 1, False)
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
