"""The one error of the offline jobs."""

from __future__ import annotations

from common.errors import ModstreamError


class JobError(ModstreamError):
    """An offline job cannot go on: a bad dataset, a missing split, an unusable option."""
