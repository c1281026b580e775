"""The one error of image loading (fetch and decode). Its reasons are exactly the
DeadLetter reasons of docs/contracts.md, so the ingest stage can dead-letter a bad input
without translating or guessing."""

from __future__ import annotations

from typing import Literal, get_args

from common.errors import ModstreamError

LoadReason = Literal["fetch_failed", "too_large", "decode_failed", "unsupported_format"]
LOAD_REASONS: frozenset[str] = frozenset(get_args(LoadReason))


class LoadError(ModstreamError):
    """An image could not be fetched or decoded; `reason` goes into the DeadLetter."""

    def __init__(self, reason: LoadReason, detail: str) -> None:
        if reason not in LOAD_REASONS:
            raise ValueError(f"unknown load error reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason: LoadReason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[LoadError], tuple[LoadReason, str]]:
        # Ray pickles exceptions across actors; keep both fields on the way.
        return (type(self), (self.reason, self.detail))
