"""Every kind of source, and bad input: each file gives a clean ingest with its bad rows counted
by reason, or a clear error naming the file, never a traceback or a silently lost good row."""
import json

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import TableSource, TextPairSource, TsvSource
from pipeline.corpus import ingest
from pipeline.sources import CorpusError
from pipeline.storage import read_raw_pairs

GOOD = "The red dog sleeps.\tEl perro rojo duerme.\tCC-BY\n"
GOOD_TOO = "Good night.\tBuenas noches.\n"


def ingest_file(tmp_path, monkeypatch, data: bytes):
    """`vamos ingest` on a one-file TSV corpus; returns (exit code, output, report or None)."""
    (tmp_path / "in.tsv").write_bytes(data)
    params = {"ingest": {"sources": [{"kind": "tsv", "name": "file", "path": "in.tsv"}]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["ingest"])
    report = tmp_path / "reports/ingest.json"
    return result.exit_code, result.output, json.loads(report.read_text()) if report.exists() else None


BAD_FILES = {
    "bom": (b"\xef\xbb\xbf" + GOOD.encode() + GOOD_TOO.encode(), {}),
    "crlf": ((GOOD + GOOD_TOO).replace("\n", "\r\n").encode(), {}),
    "invalid_utf8": (GOOD.encode() + b"Caf\xe9 au lait.\tCaf\xe9 con leche.\n" + GOOD_TOO.encode(),
                     {"invalid_utf8": 1}),
    "nul_bytes": (GOOD.encode() + b"Bad\x00line.\tMala.\n" + GOOD_TOO.encode(), {"binary_line": 1}),
    "missing_column": (GOOD.encode() + b"no tab on this line\n" + GOOD_TOO.encode(), {"missing_column": 1}),
    "extra_columns": ((GOOD + "Hello.\tHola.\tx\ty\tz\n" + GOOD_TOO).encode(), {}),
    "megabyte_line": (GOOD.encode() + b"a" * 1_000_000 + b"\tb\n" + GOOD_TOO.encode(), {"too_long": 1}),
    # 256 bytes hold one newline: 40 copies make 40 lines holding a NUL and one of invalid UTF-8.
    "binary_junk": (GOOD.encode() + bytes(range(256)) * 40 + b"\n" + GOOD_TOO.encode(),
                    {"binary_line": 40, "invalid_utf8": 1}),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_rows_are_counted_and_good_rows_kept(name, tmp_path, monkeypatch):
    data, expected_drops = BAD_FILES[name]
    code, output, report = ingest_file(tmp_path, monkeypatch, data)
    assert code == 0, output
    kept = read_raw_pairs(tmp_path / "data/raw/pairs")
    assert {"El perro rojo duerme.", "Buenas noches."} <= set(kept["tgt"])
    assert {"The red dog sleeps.", "Good night."} <= set(kept["src"])  # a BOM would stick to the first
    for reason, count in expected_drops.items():
        assert report["dropped"][reason] == count
        assert output.count(reason) >= 1  # the table in the log names the reason
    assert set(report["dropped"]) <= set(expected_drops)


def test_bad_lines_are_located(tmp_path, monkeypatch):
    _, _, report = ingest_file(tmp_path, monkeypatch, BAD_FILES["invalid_utf8"][0])
    assert report["examples"]["invalid_utf8"] == ["in.tsv:2"]


@pytest.mark.parametrize("data", [b"", b"\n\n", b"only one column\n"])
def test_a_file_with_no_pairs_is_a_clear_error(data, tmp_path, monkeypatch):
    code, output, report = ingest_file(tmp_path, monkeypatch, data)
    assert code == 2 and "no pairs left" in output and report is None
    assert "Traceback" not in output


def test_a_missing_file_is_named(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"ingest": {"sources": [{"kind": "tsv", "path": "nowhere.tsv"}]}}))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["ingest"])
    assert result.exit_code == 2 and "nowhere.tsv" in result.output


def test_table_sources_by_named_columns(tmp_path):
    frame = pd.DataFrame({"key": ["a", "b"], "english": ["Hello.", "Bye."], "spanish": ["Hola.", "Adiós."]})
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet")
    frame.to_csv(tmp_path / "t.tsv", sep="\t", index=False)
    for suffix in ("csv", "parquet", "tsv"):
        pairs, _ = ingest([TableSource(name="t", path=str(tmp_path / f"t.{suffix}"), id_column="key")], 80, 3.0)
        assert pairs[["id", "src", "tgt"]].values.tolist() == [["t:a", "Hello.", "Hola."], ["t:b", "Bye.", "Adiós."]]
    with pytest.raises(CorpusError, match=r"t.csv: no column 'english_text'"):
        ingest([TableSource(path=str(tmp_path / "t.csv"), src_column="english_text")], 80, 3.0)


def test_a_null_in_a_table_is_an_empty_side_never_the_text_none(tmp_path):
    frame = pd.DataFrame({"english": ["Hello.", None, "Bye."], "spanish": ["Hola.", "Nada.", None]})
    frame.to_parquet(tmp_path / "t.parquet")
    pairs, report = ingest([TableSource(name="t", path=str(tmp_path / "t.parquet"))], 80, 3.0)
    assert pairs[["src", "tgt"]].values.tolist() == [["Hello.", "Hola."]]
    assert report["dropped"]["empty_side"] == 2


def test_two_aligned_text_files(tmp_path):
    (tmp_path / "en.txt").write_text("Hello.\nBye.\n", encoding="utf-8")
    (tmp_path / "es.txt").write_text("Hola.\nAdiós.\n", encoding="utf-8")
    pairs, _ = ingest([TextPairSource(src_path=str(tmp_path / "en.txt"), tgt_path=str(tmp_path / "es.txt"))], 80, 3)
    assert pairs[["src", "tgt"]].values.tolist() == [["Hello.", "Hola."], ["Bye.", "Adiós."]]
    (tmp_path / "es.txt").write_text("Hola.\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="en.txt has 2 lines but .*es.txt has 1"):
        ingest([TextPairSource(src_path=str(tmp_path / "en.txt"), tgt_path=str(tmp_path / "es.txt"))], 80, 3)


def test_content_ids_are_stable_across_reingestion(tmp_path):
    path = tmp_path / "a.tsv"
    path.write_text(GOOD, encoding="utf-8")
    first, _ = ingest([TsvSource(path=str(path))], 80, 3.0)
    path.write_text("New pair.\tNuevo par.\n" + GOOD, encoding="utf-8")
    second, _ = ingest([TsvSource(path=str(path))], 80, 3.0)
    assert first["id"].iloc[0] in set(second["id"]) and len(second) == 2


def test_csv_rows_are_text_as_written_and_malformed_rows_counted_once(tmp_path):
    """Strings as written (no NA or number conversion), each malformed row counted once, however
    the file is cut into chunks."""
    (tmp_path / "t.csv").write_text('english,spanish\nNA,nulo\n"Two,\nlines.",Dos líneas.\nx,y,z\n007,007 siete\n'
                                    'Bye.,Adiós.\nonly one field\n', encoding="utf-8")
    for shard_pairs in (1, 100):
        pairs, report = ingest([TableSource(name="t", path=str(tmp_path / "t.csv"))], 80, 3.0, shard_pairs=shard_pairs)
        assert pairs[["src", "tgt"]].values.tolist() == [["NA", "nulo"], ["Two, lines.", "Dos líneas."],
                                                       ["007", "007 siete"], ["Bye.", "Adiós."]]
        assert report["dropped"] == {"malformed_row": 2}
