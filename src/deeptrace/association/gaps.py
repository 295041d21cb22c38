"""Time gaps as features: one definition of their bins, for joint inference (arrays) and
the local search (one gap at a time). A bin is an octave of the gap in ns: handlers' steps
take from microseconds to seconds, and what tells a request's next step from an unrelated
one is the gap's ratio, not its difference. (Half and quarter octaves were measured on
bench/accuracy and the original DeepTrace's spans: no better, and sparser on small windows.)"""

from __future__ import annotations

import numpy as np

BINS = 64  # bin 0: no gap (or a negative one); bin b: 2^(b-1) <= gap < 2^b ns


def gap_bins(gaps: np.ndarray) -> np.ndarray:
    """Each gap's bin."""
    out = np.zeros(len(gaps), dtype=np.int64)
    pos = gaps > 0
    out[pos] = np.minimum(np.log2(gaps[pos]).astype(np.int64) + 1, BINS - 1)
    return out


def gap_bin(gap: int) -> int:
    """`gap_bins` of one gap (an int's bit length is its octave, and cheaper than a log)."""
    return min(gap.bit_length(), BINS - 1) if gap > 0 else 0
