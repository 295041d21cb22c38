"""Association as the server does it: spans replayed through the streaming associator on a
virtual clock (each arrives one second after it ends, as an agent's batch would; a pass
each second; 5 s hold, 10 s context), so the server's accuracy is scored, not only the
whole-file association's."""

from __future__ import annotations

from deeptrace.association.streaming import StreamingAssociator

SECOND = 10**9


def streamed(spans: list[dict], algorithm: str, relink_published: bool, ship_delay_s: float = 1.0) -> list[dict]:
    assoc = StreamingAssociator(algorithm, header_ids=False, relink_published=relink_published)
    spans = sorted(spans, key=lambda d: d["end_ns"])
    out, i = [], 0
    now = spans[0]["end_ns"] if spans else 0
    while i < len(spans):
        now += SECOND
        j = i
        while j < len(spans) and spans[j]["end_ns"] + ship_delay_s * SECOND <= now:
            j += 1
        assoc.push(spans[i:j])
        i = j
        out += assoc.pop_ready(now)
    return out + assoc.close(now)


# Names the accuracy benchmark accepts besides the whole-file algorithms.
STREAMED = {
    "joint-stream": lambda spans: streamed(spans, "joint", relink_published=False),
    "joint-stream-relink": lambda spans: streamed(spans, "joint", relink_published=True),
}
