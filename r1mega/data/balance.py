"""Partitions of sequences by token count: micro-batches that fit a token budget, and parts whose
token sums are as equal as possible (micro-batches of a step, data-parallel ranks).

Pure functions of the lengths, deterministic: every rank that holds the same lengths computes the
same partition, so ranks agree on it without talking.
"""

from __future__ import annotations

import heapq
from typing import List, Sequence


def first_fit_bins(lengths: Sequence[int], budget: int) -> List[List[int]]:
    """First-fit decreasing: indices per bin, each bin at most `budget` tokens (a longer item alone)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: List[List[int]] = []
    room: List[int] = []
    for i in order:
        for b in range(len(bins)):
            if lengths[i] <= room[b]:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return [sorted(b) for b in bins]


def balanced_parts(lengths: Sequence[int], k: int) -> List[List[int]]:
    """k parts of the indices with token sums as equal as possible (Karmarkar-Karp's largest
    differencing method, k-way): parts are merged pairwise, the fullest subset of one with the
    emptiest of the other, always taking the two partial partitions whose spread is largest.

    Every part is non-empty when there are at least k items. Parts are sorted by their first index.
    """
    if k < 1:
        raise ValueError(f"balanced_parts: k={k} must be at least 1")
    heap = []
    for n, i in enumerate(sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))):
        subsets = [(lengths[i], [i])] + [(0, []) for _ in range(k - 1)]
        heapq.heappush(heap, (-lengths[i], n, subsets))
    counter = len(heap)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        # a: fullest first; b: emptiest first (each kept sorted fullest first)
        merged = [(sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, reversed(b))]
        merged.sort(key=lambda s: (-s[0], min(s[1], default=len(lengths))))
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), counter, merged))
        counter += 1
    parts = [sorted(ids) for _, ids in heap[0][2]] if heap else [[] for _ in range(k)]
    return sorted(parts, key=lambda p: p[0] if p else len(lengths))


def token_bins(lengths: Sequence[int], budget: int, min_parts: int = 1) -> List[List[int]]:
    """Micro-batches of indices: as few as first-fit decreasing needs to keep each within `budget`
    tokens (and at least min_parts when there are that many items), with token sums balanced.

    The balanced partition is kept only when no bin outgrows what first-fit allows (the budget, or
    the one longer item); otherwise first-fit's bins are split until there are min_parts.
    """
    if not lengths:
        return []
    bins = first_fit_bins(lengths, budget)
    k = max(len(bins), min(min_parts, len(lengths)))
    balanced = balanced_parts(lengths, k)
    limit = max(budget, max(lengths))
    if all(sum(lengths[i] for i in part) <= limit for part in balanced):
        return balanced
    while len(bins) < k:
        big = max(range(len(bins)), key=lambda b: len(bins[b]))
        half = len(bins[big]) // 2
        bins[big:big + 1] = [bins[big][:half], bins[big][half:]]
    return bins
