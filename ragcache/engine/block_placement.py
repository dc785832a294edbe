"""Where a sequence's new KV blocks go: runs of consecutive blocks.

Attention reads a sequence whose blocks are consecutive as one slice of the pool,
with no gather of scattered blocks (``ragcache.kernels.paged_attention``). The block
manager therefore places a new sequence at the start of a run of free blocks long
enough for its prompt and its expected output, keeps the blocks after the prompt
reserved for that sequence's decode steps, and hands out a reserved block to another
sequence only when no unreserved run fits.
"""

from __future__ import annotations

import numpy as np

PLACEMENTS = ("contiguous", "fifo")


def runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and lengths of the runs of True in a boolean mask."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    return starts, np.flatnonzero(edges == -1) - starts


def best_fit(mask: np.ndarray, length: int) -> int | None:
    """Start of the shortest run of at least ``length`` True entries; None if none is."""
    starts, lengths = runs(mask)
    fitting = np.flatnonzero(lengths >= length)
    if fitting.size == 0:
        return None
    return int(starts[fitting[np.argmin(lengths[fitting])]])


def longest_run(mask: np.ndarray) -> tuple[int, int]:
    """(start, length) of the longest run of True entries; (0, 0) if there is none."""
    starts, lengths = runs(mask)
    if lengths.size == 0:
        return 0, 0
    best = int(np.argmax(lengths))
    return int(starts[best]), int(lengths[best])


def place_run(candidates: list[np.ndarray], lengths: list[int]) -> tuple[int, int] | None:
    """(start, length) of the best fit for the first length that fits, trying each
    candidate mask in order of preference for each length; None if nothing fits."""
    for length in lengths:
        for mask in candidates:
            start = best_fit(mask, length)
            if start is not None:
                return start, length
    return None
