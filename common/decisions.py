"""From signals and dedup matches to Verdicts: the pure part of scoring a batch.

Kept apart from the actors so the rules (which source a verdict gets, what a
replay returns, which images in one batch duplicate each other) are tested
without Kafka or Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from common.dedupstate import BankHit, Entry, Match, digest64
from common.features import ImageFeatures, hamming, near_matchable
from common.fusion import FusionTree, Thresholds
from common.messages import (
    Action,
    Bank,
    Hashes,
    Label,
    Signals,
    UploadEvent,
    Verdict,
    VerdictSource,
    utc_timestamp,
)

DUPLICATE_SOURCES = {"exact": "exact_duplicate", "near": "near_duplicate", "image_review": "review_cache",
                     "bank": "hash_bank"}


@dataclass(frozen=True)
class Decision:
    """A verdict's content before it is stamped with latency and time."""

    action: str
    label: str
    score: float
    source: str
    matched_image_id: str | None
    signals: dict[str, Any]
    model_version: str | None = None  # the bundle that made a remembered verdict; None: the current one
    bank: BankHit | None = None  # the hash bank entry, for source hash_bank


def decide_from_match(event: UploadEvent, match: Match) -> Decision:
    """Reuse a remembered verdict; a replay of the event that made it gets it back as is."""
    entry = match.entry
    if match.kind == "exact" and not entry.reviewed and entry.event_key == digest64(event.event_id):
        return Decision(entry.action, entry.label, entry.score, "model", None, dict(entry.signals),
                        entry.model_version or None)
    signals = {"knn": None, "cnn": None, "pdq_distance": match.distance}
    if match.kind == "bank":
        return Decision(entry.action, entry.label, entry.score, "hash_bank", None, signals, None, match.bank)
    source = "review_cache" if entry.reviewed else DUPLICATE_SOURCES[match.kind]
    return Decision(entry.action, entry.label, entry.score, source, entry.image_id or None, signals,
                    entry.model_version or None)


def decide_from_model(knn: float | None, cnn: float | None, tree: FusionTree,
                      thresholds: Thresholds) -> Decision:
    signals = {"knn": knn, "cnn": cnn, "pdq_distance": None}
    score = min(1.0, max(0.0, float(tree.predict(signals))))
    action, label = thresholds.decide(score)
    return Decision(action, label, score, "model", None, signals)


def decide_as_copy(leader: Decision, leader_image_id: str, distance: int, exact: bool) -> Decision:
    """An image whose original is earlier in the same batch gets the original's verdict."""
    source = "exact_duplicate" if exact else "near_duplicate"
    return Decision(leader.action, leader.label, leader.score, source, leader_image_id,
                    {"knn": None, "cnn": None, "pdq_distance": distance}, leader.model_version)


@dataclass(frozen=True)
class BatchCopy:
    """Image ``index`` of a batch copies the earlier image ``leader``."""

    leader: int
    distance: int
    exact: bool


def batch_copies(features: Sequence[ImageFeatures], max_distance: int,
                 dihedral: bool = False) -> dict[int, BatchCopy]:
    """Copies inside one batch: same MD5, or PDQs of quality >= 50 within max_distance (the dedup rule).

    Dedup state learns a verdict only after its batch, so these are found here.
    Images absent from the result are leaders: they need the model.
    """
    leaders: list[int] = []
    copies: dict[int, BatchCopy] = {}
    for i, current in enumerate(features):
        best: BatchCopy | None = None
        for j in leaders:
            if features[j].md5 == current.md5:
                best = BatchCopy(j, 0, True)
                break
            if near_matchable(current.pdq_quality) and near_matchable(features[j].pdq_quality):
                distance = min(hamming(features[j].pdq_int, variant) for variant in variants(current, dihedral))
                if distance <= max_distance and (best is None or distance < best.distance):
                    best = BatchCopy(j, distance, False)
        if best is None:
            leaders.append(i)
        else:
            copies[i] = best
    return copies


def variants(features: ImageFeatures, dihedral: bool) -> tuple[int, ...]:
    """The PDQs a lookup tries: the image's own, or all 8 rotations/flips with dihedral matching."""
    return features.pdq_variants if dihedral else features.pdq_variants[:1]


def to_verdict(event: UploadEvent, features: ImageFeatures, decision: Decision, bundle_id: str,
               latency_ms: float) -> Verdict:
    return Verdict(
        event_id=event.event_id, image_id=event.image_id,
        # Plain strings until here; Verdict validates them against its literals at run time.
        action=cast(Action, decision.action), label=cast(Label, decision.label),
        score=decision.score, source=cast(VerdictSource, decision.source), matched_image_id=decision.matched_image_id,
        signals=Signals(**decision.signals),
        hashes=Hashes(md5=features.md5, pdq=features.pdq, pdq_quality=features.pdq_quality, phash=features.phash),
        bank=None if decision.bank is None else Bank(name=decision.bank.name, entry_id=decision.bank.entry_id),
        model_version=decision.model_version or bundle_id, latency_ms=max(0.0, latency_ms), ts=utc_timestamp(),
    )


def entry_for(event: UploadEvent, features: ImageFeatures, decision: Decision, bundle_id: str) -> Entry:
    """What dedup remembers of a model verdict, so copies and replays reuse it."""
    return Entry(md5=features.md5, pdq=features.pdq, pdq_quality=features.pdq_quality,
                 image_id=event.image_id, event_key=digest64(event.event_id), action=decision.action,
                 label=decision.label, score=decision.score,
                 signals={"knn": decision.signals.get("knn"), "cnn": decision.signals.get("cnn")},
                 model_version=bundle_id)
