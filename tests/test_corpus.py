import pandas as pd
from hypothesis import given, strategies as st

from pipeline.config import SwordSource
from pipeline.corpus import clean_pairs, ingest, word_count
from pipeline.sources import Drops


def test_bible_pairs_are_aligned_and_clean():
    pairs, report = ingest([SwordSource(books=["Ruth", "Jonah"])], max_words=80, max_ratio=3.0)
    assert report["kept"] == len(pairs) > 120
    assert pairs["id"].is_unique and pairs["id"].iloc[0] == "Ruth.1.1"
    assert not pairs["src"].str.contains("<|>").any()
    first = pairs.set_index("id").loc["Jonah.1.1"]
    assert "Jonah" in first["src"] and "Jonás" in first["tgt"]


def test_each_cleaning_rule_is_counted():
    frame = pd.DataFrame({
        "id": list("abcdefg"),
        "src": ["Hello  there.", "", "one two three four five six", "x", "Same", "Hello there.", "ok"],
        "tgt": ["Hola.", "Vacío", "uno", "uno dos tres cuatro cinco seis siete", "same", "Hola.", "bien"],
    })
    drops = Drops()
    kept = clean_pairs(frame, drops, max_words=6, max_ratio=2.5)
    assert kept["id"].tolist() == ["a", "g"]
    assert kept["src"].iloc[0] == "Hello there."
    assert drops.as_dict() == {"duplicate": 1, "empty_side": 1, "length_ratio": 1, "source_equals_target": 1,
                               "too_long": 1, "repaired_unicode_or_whitespace": 1}


sides = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)


@given(st.lists(st.tuples(sides, sides), max_size=40))
def test_cleaning_loses_no_row_without_counting_it(rows):
    frame = pd.DataFrame(rows, columns=["src", "tgt"], dtype=object)
    frame.insert(0, "id", [str(i) for i in range(len(rows))])
    drops = Drops()
    kept = clean_pairs(frame, drops, max_words=8, max_ratio=2.0)
    dropped = sum(n for reason, n in drops.counts.items() if not reason.startswith("repaired_"))
    assert len(kept) + dropped == len(rows)
    assert set(kept["id"]) <= set(frame["id"])
    assert all(kept["src"].str.len() > 0) and all(kept["tgt"].str.len() > 0)
    assert not kept.duplicated(["src", "tgt"]).any()


def test_a_chinese_character_counts_as_a_word():
    texts = pd.Series(["The file could not be opened.", "无法打开文件。", "保存对 GNOME 的更改吗？"])
    assert word_count(texts).tolist() == [6, 8, 11]  # (spaces + 1) + characters: near enough
    frame = pd.DataFrame({"id": ["a"], "origin": ["t"], "src": [texts[0]], "tgt": [texts[1]]})
    drops = Drops()
    assert len(clean_pairs(frame, drops, max_words=80, max_ratio=3.0)) == 1, drops.as_dict()
