"""Verse alignment within a chapter when two Bible translations number verses differently.

Translations disagree on verse boundaries (the Reina-Valera 1909 module starts some chapters one
verse later than the World English Bible, or merges two verses mid-chapter). Pairing verses by
reference alone then shifts every later pair by one verse. A small dynamic programme over verse
lengths (in the spirit of Gale & Church, 1993) finds the monotonic pairing with the lowest cost,
where a pair costs the mismatch of its length ratio and leaving a verse unpaired costs `skip`."""
from __future__ import annotations

import math

import numpy as np


def length_cost(src_len: int, tgt_len: int, typical_log_ratio: float) -> float:
    """How unlike a translation pair two lengths (in characters) are; an empty side never pairs."""
    if not src_len or not tgt_len:
        return math.inf
    return abs(math.log(src_len / tgt_len) - typical_log_ratio)


def align_lengths(src: list[int], tgt: list[int], typical_log_ratio: float = 0.0, skip: float = 1.2,
                  shift: float = 0.05, margin: float = 0.5, band: int = 6) -> list[tuple[int, int]]:
    """Index pairs (i, j) pairing src[i] with tgt[j], monotonic, within `band` of the diagonal.

    Pairing off the diagonal (different verse numbers) costs `shift` more, and the result is kept
    only if it beats pairing by verse number by `margin`: lengths must clearly disagree before a
    chapter is re-paired."""
    n, m = len(src), len(tgt)
    diagonal = [(i, i) for i in range(min(n, m)) if src[i] and tgt[i]]
    diagonal_cost = (sum(length_cost(src[i], tgt[i], typical_log_ratio) for i, _ in diagonal)
                     + skip * (n + m - 2 * len(diagonal)))
    band += abs(n - m)  # the corner (n, m) must be reachable
    cost = np.full((n + 1, m + 1), np.inf)
    move = np.zeros((n + 1, m + 1), dtype=np.int8)  # 1 pair, 2 skip src, 3 skip tgt
    cost[0, 0] = 0.0
    for i in range(n + 1):
        for j in range(max(0, i - band), min(m, i + band) + 1):
            if i and j:
                paired = (cost[i - 1, j - 1] + length_cost(src[i - 1], tgt[j - 1], typical_log_ratio)
                          + (shift if i != j else 0.0))
                if paired < cost[i, j]:
                    cost[i, j], move[i, j] = paired, 1
            if i and cost[i - 1, j] + skip < cost[i, j]:
                cost[i, j], move[i, j] = cost[i - 1, j] + skip, 2
            if j and cost[i, j - 1] + skip < cost[i, j]:
                cost[i, j], move[i, j] = cost[i, j - 1] + skip, 3
    if cost[n, m] > diagonal_cost - margin:
        return diagonal
    pairs, i, j = [], n, m
    while i or j:
        if move[i, j] == 1:
            i, j = i - 1, j - 1
            pairs.append((i, j))
        elif move[i, j] == 2:
            i -= 1
        else:
            j -= 1
    return pairs[::-1]


# A chapter whose typical pair still has a length mismatch this large (about 2.5 times the
# Bible's usual 0.085) is misaligned beyond what lengths can repair: better lost than learned.
MAX_CHAPTER_COST = 0.2


def align_verses(src: dict[str, str], tgt: dict[str, str]) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """Pairs of (source reference, target reference) over two Bibles' verse texts, aligned chapter
    by chapter; the chapters whose pairing differs from pairing by reference; and the chapters
    left out because no pairing of them looks like a translation."""
    def chapters(verses: dict[str, str]) -> dict[str, list[str]]:
        grouped: dict[str, list[str]] = {}
        for ref in verses:
            grouped.setdefault(ref.rsplit(".", 1)[0], []).append(ref)
        return grouped

    both = [r for r in src if r in tgt and src[r] and tgt[r]]
    typical = float(np.median([math.log(len(src[r]) / len(tgt[r])) for r in both])) if both else 0.0
    src_chapters, tgt_chapters = chapters(src), chapters(tgt)
    pairs, realigned, misaligned = [], [], []
    for chapter, src_refs in src_chapters.items():
        tgt_refs = tgt_chapters.get(chapter)
        if not tgt_refs:
            continue
        found = align_lengths([len(src[r]) for r in src_refs], [len(tgt[r]) for r in tgt_refs], typical)
        chapter_pairs = [(src_refs[i], tgt_refs[j]) for i, j in found]
        costs = [length_cost(len(src[s]), len(tgt[t]), typical) for s, t in chapter_pairs]
        if costs and np.median(costs) > MAX_CHAPTER_COST:
            misaligned.append(chapter)
            continue
        if any(s != t for s, t in chapter_pairs):
            realigned.append(chapter)
        pairs.extend(chapter_pairs)
    return pairs, realigned, misaligned
