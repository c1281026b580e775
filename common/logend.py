"""When has a reader seen everything a partition held at a given moment?

Kafka answers with the partition's end offset (ListOffsets, "latest"). The
embedded broker answers with the base offset of the partition's last record
batch plus one: too low whenever that batch holds several records (measured:
after a batch at offsets 7-9 it says 8, and fetches report a high watermark
of 10). A fetch response's high watermark is right on both brokers but only
as fresh as the last fetch. Together they are exact: if a reader has fetched
past a fresh listed end, it fetched the last batch that end points into, and
that fetch (or a later one) reported a high watermark at or past the batch's
end. So the target is the larger of the two.
"""

from __future__ import annotations


def log_end(listed_end: int, highwater: int | None) -> int:
    """The offset a reader must reach to have seen what the partition held when ``listed_end`` was asked.

    ``listed_end`` must be asked after the moment in question; ``highwater``
    is the newest high watermark the reader's own fetches reported (None
    before its first fetch).
    """
    return max(listed_end, highwater or 0)
