"""benchmarks/score.py's paired comparison, on outputs the test writes (the decoding it shares
with `evaluate` is tested there)."""
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import Params, ParamsError
from tests.conftest import small_params

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from common import params_with  # noqa: E402
from score import apertium, main as score_main, print_paired  # noqa: E402
from snapshots import snapshot_models  # noqa: E402

REFERENCES = ["the cat sat on the mat .", "a dog ran in the park .", "he went home late ."] * 10


def table_rows(text: str) -> dict[tuple[str, str], list[str]]:
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    return {(cells[0].strip(), cells[1].strip()): [c.strip() for c in cells[2:]] for cells in rows[1:]}


def test_each_model_is_compared_with_the_first_on_every_metric_with_its_direction(capsys):
    worse = ["the cat sat .", "a dog ran .", "he went ."] * 10
    print_paired([Path("first.pt"), Path("same.pt"), Path("worse.pt")], [REFERENCES, REFERENCES, worse],
                 REFERENCES, Params.model_validate({"register": {"bootstrap_samples": 100}}))
    rows = table_rows(capsys.readouterr().out)
    assert set(rows) == {(model, metric) for model in ("same.pt", "worse.pt") for metric in ("bleu", "chrf", "ter")}
    assert rows[("same.pt", "bleu")][0] == "+0.00" and float(rows[("same.pt", "bleu")][2]) == 1.0
    assert float(rows[("worse.pt", "bleu")][0]) < -10 and float(rows[("worse.pt", "chrf")][0]) < -10
    assert float(rows[("worse.pt", "ter")][0]) > 10  # a worse TER is higher: the column says which way is better
    assert [rows[("worse.pt", metric)][3] for metric in ("bleu", "chrf", "ter")] == ["higher", "higher", "lower"]


def test_apertium_translates_line_for_line():
    """Debian's rule-based translator, the baseline beside the models (scripts/setup.sh installs it)."""
    sources = ["¿Dónde está la estación?", "", "El archivo no pudo ser abierto.\nGuardar", "Vamos."]
    out = apertium("spa-eng", sources)
    assert len(out) == 4 and out[1] == ""
    assert out[0].startswith("Where") and "opened. Save" in out[2]  # a newline inside a line: a space


def test_apertium_translates_each_line_as_it_does_alone():
    """Lines without a full stop must not run into the next: across single line breaks Apertium
    read on, and "Could not open the file" / "Authentication warning overridden." came out as
    "No podría abrir el aviso" / "de Autentificación de la lima overridden."."""
    sources = ["Could not open the file", "Authentication warning overridden.", "File not found",
               "Need one URL as argument", "Warning", "The following packages have unmet dependencies:"]
    assert apertium("eng-spa", sources) == [apertium("eng-spa", [line])[0] for line in sources]


def test_set_overrides_are_yaml_values_checked_as_the_flows_are(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(small_params()))
    monkeypatch.chdir(tmp_path)
    params = params_with(["train.hidden_size=64", "train.max_minutes=null", "flow.retry_delays_seconds=[1, 2.5]",
                          "train.lr_schedule=cosine"])
    assert (params.train.hidden_size, params.train.max_minutes, params.train.lr_schedule) == (64, None, "cosine")
    assert params.flow.retry_delays_seconds == [1, 2.5]
    with pytest.raises(ParamsError, match=r"train\.hiden_size"):
        params_with(["train.hiden_size=64"])


def test_each_snapshot_becomes_a_model_file_that_an_ensemble_packs(tmp_path):
    """A run's kept weights, written with best.pt's vocabularies: each loads as its own weights,
    and `vamos ensemble` packs them (a checkpoint ensemble)."""
    import torch
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.model import load_translator
    from tests.test_ensemble import other_model, save

    run = tmp_path / "run"
    run.mkdir()
    save(run / "best.pt", other_model(1, right_to_left=True))
    snapshots = {step: other_model(step, right_to_left=True).state_dict() for step in (200, 400)}
    for step, weights in snapshots.items():
        torch.save(weights, run / f"weights-{step:08d}.pt")
    written = snapshot_models(run, tmp_path / "models")
    assert [p.name for p in written] == ["weights-00000200.pt", "weights-00000400.pt"]
    for path, weights in zip(written, snapshots.values()):
        loaded = load_translator(path)
        assert all(torch.equal(loaded.model.state_dict()[k], w) for k, w in weights.items())
        assert loaded.tgt_vocab.itos == load_translator(run / "best.pt").tgt_vocab.itos
        assert loaded.model.config.right_to_left  # the run's config, as best.pt holds it
    result = CliRunner().invoke(app, ["ensemble", *map(str, written), "-o", str(tmp_path / "both.pt")])
    assert result.exit_code == 0 and len(load_translator(tmp_path / "both.pt").model.members) == 2
    with pytest.raises(ValueError, match="not over its snapshots"):
        snapshot_models(run, run)
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "best.pt").write_bytes((run / "best.pt").read_bytes())
    with pytest.raises(FileNotFoundError, match="no weights-"):
        snapshot_models(lone, tmp_path / "again")  # best.pt alone, no snapshot


def test_by_origin_scores_each_source_as_origin_alone_would(tmp_path, monkeypatch, capsys):
    """One decoding of the whole split, then each source's rows: the same figures as decoding
    that source alone with --origin."""
    import pandas as pd

    from pipeline import storage
    from tests.test_ensemble import other_model, save

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(small_params(**{"evaluate.beam_size": 2})))
    monkeypatch.chdir(tmp_path)
    first, second = save(tmp_path / "a.pt", other_model(1)), save(tmp_path / "b.pt", other_model(2))
    rows = [("a b c", "u v w", "bible"), ("d e", "x y", "software"), ("f g h i", "z u", "bible"), ("j", "v", "software")]
    frame = pd.DataFrame(rows * 5, columns=["src", "tgt", "origin"])
    frame.to_parquet(storage.split_path("test", tmp_path))
    options = dict(split="test", data=tmp_path, set=[], apertium_pair=None)
    score_main([first, second], origin=None, by_origin=True, **options)
    sections = capsys.readouterr().out.split("\n### ")
    assert [section.split("\n")[0] for section in sections[1:]] == ["bible", "software"]
    assert table_lines(sections[1])[2:] != table_lines(sections[2])[2:]  # the sources score apart
    for section in sections[1:]:
        name = section.split("\n")[0]
        score_main([first, second], origin=name, by_origin=False, **options)
        alone = capsys.readouterr().out
        assert table_lines(section) == table_lines(alone) and len(table_lines(alone)) == 4 + 2 + 3
        assert "| 10 |" in section


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


@pytest.mark.slow
def test_the_rest_soak_sends_its_mix_and_counts_every_answer(trained_copy):
    """benchmarks/rest.py --soak-minutes, briefly, against a real `mlflow models serve` of the
    trained champion: every kind of request sent, good ones answered 200, bad ones 4xx, no 5xx."""
    import subprocess

    done = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "rest.py"),
                           "--soak-minutes", "0.25", "--clients", "4"], cwd=trained_copy, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {cells[0]: cells for cells in (
        [c.strip() for c in line.split("|")[1:-1]] for line in done.stdout.splitlines() if line.startswith("| "))}
    assert all(int(rows[kind][1]) > 0 for kind in ("good", "over-long", "malformed")), done.stdout
    assert rows["good"][2].startswith("200: ") and ", " not in rows["good"][2], done.stdout  # 200 only
    assert all(status.split(":")[0].startswith("4") for kind in ("over-long", "malformed")
               for status in rows[kind][2].split(", ")), done.stdout
    assert "5xx or no answer: 0; good not 200 or bad not 4xx: 0" in done.stdout
    assert "server RSS, all processes (MiB), by minute: 0: " in done.stdout
