from pipeline.align import align_lengths, align_verses

LENGTHS = [40, 120, 65, 200, 90, 30, 150, 75, 110, 55]


def test_aligned_chapter_pairs_by_verse_number():
    assert align_lengths(LENGTHS, [n + 3 for n in LENGTHS]) == [(i, i) for i in range(len(LENGTHS))]


def test_chapter_shifted_by_one_verse_is_repaired():
    # The target starts a verse late: its verse 1 belongs to the previous chapter.
    shifted = [80] + LENGTHS[:-1]
    assert align_lengths(LENGTHS, shifted) == [(i, i + 1) for i in range(len(LENGTHS) - 1)]


def test_empty_verses_are_never_paired():
    pairs = align_lengths([40, 0, 65, 200], [42, 50, 60, 190])
    assert (1, 1) not in pairs and (0, 0) in pairs and (3, 3) in pairs


def test_align_verses_reports_realigned_chapters():
    src = {f"Num.13.{v}": "x" * n for v, n in enumerate(LENGTHS, start=1)}
    src.update({f"Num.14.{v}": "y" * n for v, n in enumerate(LENGTHS, start=1)})
    tgt = {f"Num.13.{v}": "x" * n for v, n in enumerate([80] + LENGTHS[:-1], start=1)}
    tgt.update({f"Num.14.{v}": "y" * n for v, n in enumerate(LENGTHS, start=1)})
    pairs, realigned, misaligned = align_verses(src, tgt)
    assert realigned == ["Num.13"] and misaligned == []
    assert ("Num.13.1", "Num.13.2") in pairs and ("Num.14.1", "Num.14.1") in pairs


def test_chapter_beyond_repair_is_left_out():
    src = {f"Ps.{c}.{v}": "x" * n for c in (1, 2, 3) for v, n in enumerate(LENGTHS, start=1)}
    tgt = dict(src)
    tgt.update({f"Ps.2.{v}": "x" * n for v, n in enumerate([300, 20, 250, 15, 280, 25, 260, 10, 240, 30], start=1)})
    pairs, _, misaligned = align_verses(src, tgt)
    assert misaligned == ["Ps.2"] and not any(s.startswith("Ps.2.") for s, _ in pairs)
