import shutil
import unicodedata

import pytest
from hypothesis import given, strategies as st

from pipeline.config import SwordSource
from pipeline.sources import (CorpusError, Drops, normalise, osis_to_text, read_sword_module, read_sword_pairs,
                              tsv_rows)


def test_removed_notes_do_not_glue_words():
    markup = ('<w lemma="strong:H0430">God</w><note placement="foot"><reference>1:1 </reference>The Hebrew '
              'word</note><w lemma="strong:H1254">created</w> <w>the</w> <w>heavens</w>.')
    assert osis_to_text(markup) == "God created the heavens."


def test_translator_added_words_stay_separate():
    markup = '<w lemma="strong:H0834">que</w><transChange type="added">estaba</transChange><w>en</w> ella'
    assert osis_to_text(markup) == "que estaba en ella"


def test_canonical_titles_kept_and_headings_dropped():
    markup = ('<title canonical="true" type="psalm">A Psalm by David.</title> <title type="section">Trust</title>'
              '<l level="1"/>Yahweh, how<l eID="x"/>many!')
    assert osis_to_text(markup) == "A Psalm by David. Yahweh, how many!"


def test_trailing_glossary_is_cut_and_counted():
    drops = Drops()
    markup = 'Amen.<chapter eID="Rev.22"/><div type="glossary"><item>Zion is a name</item></div>'
    assert osis_to_text(markup, drops) == "Amen."
    assert drops.counts["repaired_trailing_matter_cut"] == 1


def test_reads_installed_bible_module_by_osis_reference():
    english = read_sword_module("/usr/share/sword", "engWEB2015eb", ["Ruth"])
    spanish = read_sword_module("/usr/share/sword", "spaRV1909eb", ["Ruth"])
    assert len(english) == len(spanish) == 85
    assert "Naomi" in osis_to_text(english["Ruth.1.2"])
    assert "Noemi" in osis_to_text(spanish["Ruth.1.2"])


def test_a_second_version_of_the_verses_gets_ids_of_its_own():
    web = read_sword_pairs(SwordSource(books=["Ruth"]), Drops(), {})
    kjv = read_sword_pairs(SwordSource(src_module="engKJV2006eb", books=["Ruth"], variant="kjv"), Drops(), {})
    assert [i for i, _, _ in web][:2] == ["Ruth.1.1", "Ruth.1.2"]  # no variant: ids as they always were
    assert [i for i, _, _ in kjv] == [f"{i}@kjv" for i, _, _ in web]
    web_text, kjv_text = {i: s for i, s, _ in web}, {i: s for i, s, _ in kjv}
    assert web_text["Ruth.1.1"] != kjv_text["Ruth.1.1@kjv"] and "judges" in kjv_text["Ruth.1.1@kjv"]
    assert {i: t for i, _, t in web} == {i.removesuffix("@kjv"): t for i, _, t in kjv}  # one Spanish verse each


def test_missing_module_is_a_clear_error():
    with pytest.raises(CorpusError, match="no SWORD module 'nope'"):
        read_sword_module("/usr/share/sword", "nope")


def test_tsv_bad_lines_are_counted_not_fatal(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_bytes(b"\xef\xbb\xbfHello.\tHola.\tCC\r\n"
                     b"no tab here\n"
                     b"Bad \xff byte\tMal\n"
                     b"nul\x00\tbyte\n"
                     b"Good night.\tBuenas noches.\n")
    drops = Drops()
    rows = list(tsv_rows(path, drops))
    assert rows == [(None, "Hello.", "Hola."), (None, "Good night.", "Buenas noches.")]
    assert drops.as_dict() == {"binary_line": 1, "invalid_utf8": 1, "missing_column": 1}


def test_unreadable_file_names_the_file(tmp_path):
    with pytest.raises(CorpusError, match="missing.tsv"):
        list(tsv_rows(tmp_path / "missing.tsv", Drops()))


@given(st.text())
def test_normalise_is_idempotent_nfc_and_control_free(text):
    once = normalise(text)
    assert normalise(once) == once
    assert unicodedata.is_normalized("NFC", once)
    assert not any(unicodedata.category(c) == "Cc" for c in once)
    assert once == once.strip() and "  " not in once


def test_reads_modules_from_a_zip(tmp_path):
    archive = shutil.make_archive(str(tmp_path / "modules"), "zip", "/usr/share/sword")
    verses = read_sword_module(archive, "spaRV1909eb", ["Ruth"])
    assert len(verses) == 85 and "Noemi" in osis_to_text(verses["Ruth.1.2"])
