import re

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import ParamsError, dvc_set_args, load_params, params_with
from tests.conftest import REPO, small_params


def write(tmp_path, data) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_project_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.train.attention in {"dot", "general", "bahdanau"}
    assert params.registry.model_name == "vamos-en-es"


def test_unknown_key_is_named(tmp_path):
    params = small_params()
    params["train"]["hiden_size"] = 10
    with pytest.raises(ParamsError, match=r"train\.hiden_size"):
        load_params(write(tmp_path, params))


def test_bad_value_is_named_with_file(tmp_path):
    params = small_params()
    params["train"]["lr"] = -1
    with pytest.raises(ParamsError) as error:
        load_params(write(tmp_path, params))
    assert "params.yaml" in str(error.value) and "train.lr" in str(error.value)


def test_bad_source_kind_is_named(tmp_path):
    params = small_params()
    params["ingest"]["sources"] = [{"kind": "ftp", "path": "x"}]
    with pytest.raises(ParamsError, match="ingest.sources.0"):
        load_params(write(tmp_path, params))


def test_two_sources_of_one_name_are_rejected(tmp_path):
    """Their pairs' ids and their counts would collide: real pairs dropped as duplicates."""
    params = small_params()
    params["ingest"]["sources"] = [{"kind": "tsv", "path": "a.tsv"}, {"kind": "tsv", "path": "b.tsv"}]
    with pytest.raises(ParamsError, match=r"ingest.*sources share the name 'tsv'"):
        load_params(write(tmp_path, params))


def test_two_sword_sources_of_one_variant_are_rejected_by_name(tmp_path):
    """Their verse ids would collide: the second version's verses dropped as duplicates."""
    bible = {"kind": "sword", "name": "bible"}
    for variants in ((None, None), ("kjv", "kjv")):
        params = small_params()
        params["ingest"]["sources"] = [{**bible, "variant": variants[0]},
                                       {**bible, "name": "bible-kjv", "src_module": "engKJV2006eb",
                                        "variant": variants[1]}]
        with pytest.raises(ParamsError, match=rf"sword sources 'bible', 'bible-kjv' share the variant "
                                              rf"{re.escape(repr(variants[0]))} and books"):
            load_params(write(tmp_path, params))
    params["ingest"]["sources"][0]["variant"] = None  # one version without a variant, one with: fine
    assert load_params(write(tmp_path, params)).ingest.sword_variants() == {"bible-kjv": "kjv"}
    # Books of their own (a held-out book beside the rest): their ids cannot collide.
    params["ingest"]["sources"] = [{**bible, "name": "ruth", "books": ["Ruth"]}, {**bible, "books": ["Gen", "Exod"]}]
    assert load_params(write(tmp_path, params)).ingest.sword_variants() == {}
    params["ingest"]["sources"][1]["books"] = ["ruth"]
    with pytest.raises(ParamsError, match="sword sources 'ruth', 'bible' share the variant None and books"):
        load_params(write(tmp_path, params))


@pytest.mark.parametrize("source, message", [
    ({"kind": "tsv", "name": "my corpus", "path": "a.tsv"}, r"source name 'my corpus' must match"),
    ({"kind": "folder", "name": "in/coming", "path": "x"}, r"source name 'in/coming' must match"),
    ({"kind": "sword", "name": "bible-kjv", "variant": "k j v"}, r"source 'bible-kjv': variant 'k j v' must match"),
    ({"kind": "sword", "name": "bible-kjv", "variant": "kjv@1"}, r"source 'bible-kjv': variant 'kjv@1' must match"),
])
def test_source_names_and_variants_must_be_plain(tmp_path, source, message):
    """Names key MLflow metrics (test_<name>_bleu); variants end pair ids (Gen.1.1@kjv)."""
    params = small_params()
    params["ingest"]["sources"].append(source)
    with pytest.raises(ParamsError, match=rf"ingest: .*{message}"):
        load_params(write(tmp_path, params))


def test_the_project_source_names_are_plain():
    names = [source.name for source in load_params(REPO / "params.yaml").ingest.sources]
    assert {"bible", "software", "software-test", "incoming"} <= set(names)


def test_a_gettext_source_needs_english_as_the_source_language(tmp_path):
    """A catalog's messages are English: reversed for Spanish to English, they would train nonsense."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"].update(src_lang="es", tgt_lang="en")
    with pytest.raises(ParamsError, match=r"'software', 'software-test': a gettext catalog translates from English"):
        load_params(write(tmp_path, params))
    params["ingest"]["sources"] = [s for s in params["ingest"]["sources"] if s["kind"] != "gettext"]
    params["prepare"]["split"]["hold_out"] = {}
    assert load_params(write(tmp_path, params)).prepare.src_lang == "es"


def test_split_must_leave_training_data(tmp_path):
    params = small_params()
    params["prepare"]["split"] = {"valid": 0.3, "test": 0.3}
    with pytest.raises(ParamsError, match="split"):
        load_params(write(tmp_path, params))


def test_subwords_default_to_words_and_bad_values_are_named(tmp_path):
    assert load_params(REPO / "params.yaml").prepare.subwords.model == "none"
    params = small_params()
    del params["prepare"]["subwords"]
    assert load_params(write(tmp_path, params)).prepare.subwords.model == "none"
    for bad, key in (({"model": "wordpiece"}, "prepare.subwords.model"), ({"model": None}, "prepare.subwords.model"),
                     ({"model": "bpe", "vocab_size": 10}, "prepare.subwords.vocab_size"),
                     ({"model": "bpe", "size": 100}, "prepare.subwords.size")):
        params["prepare"]["subwords"] = bad
        with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
            load_params(write(tmp_path, params))
    params["prepare"]["subwords"] = {"model": "unigram", "vocab_size": 4000}
    assert load_params(write(tmp_path, params)).prepare.subwords.vocab_size == 4000


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(write(tmp_path, "train: [unclosed"))
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_stage_rejects_bad_params_before_any_work(tmp_path, monkeypatch):
    params = small_params()
    params["embed"]["sg"] = 3
    write(tmp_path, params)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["ingest"])
    assert result.exit_code == 2
    assert "embed.sg" in result.output
    assert not (tmp_path / "data").exists() and not (tmp_path / "reports").exists()


def test_params_with_applies_good_overrides_and_names_a_bad_key(tmp_path):
    params = small_params()
    del params["train"]["max_steps"]  # a key the file leaves at its default may still be set
    path = write(tmp_path, params)
    assert params_with(path, None) == load_params(path)
    changed = params_with(path, {"train.hidden_size": 64, "train.max_steps": 5, "flow.stage_timeouts": {"train": 9}})
    assert (changed.train.hidden_size, changed.train.max_steps, changed.flow.stage_timeouts) == (64, 5, {"train": 9})
    assert changed.train.lr == load_params(path).train.lr  # the rest as the file says
    for overrides, named, why in (({"train.hiden_size": 64}, "train.hiden_size", "no such param"),
                                  ({"trian.hidden_size": 64}, "trian.hidden_size", "trian is not a section"),
                                  ({"train.hidden_size": 1}, "train.hidden_size", "invalid params")):
        with pytest.raises(ParamsError, match=why) as error:
            params_with(path, overrides)
        assert error.match(re.escape(named))


def test_a_bad_key_of_the_file_is_named_before_any_override(tmp_path):
    params = small_params()
    params["train"]["hiden_size"] = 10
    with pytest.raises(ParamsError, match=r"train\.hiden_size"):
        params_with(write(tmp_path, params), {"train.hidden_size": 64})


def test_overrides_of_every_type_reach_params_yaml_through_dvcs_set_param_grammar(tmp_path):
    from dvc.utils.hydra import apply_overrides

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"flow": {"stage_timeouts": {}, "retry_delays_seconds": [1]},
                                      "train": {"hidden_size": 256, "max_minutes": 3, "lr_schedule": "plateau",
                                                "lexicon": True}}))
    overrides = {"flow.stage_timeouts": {"embed": 20, "train": 90.5}, "flow.retry_delays_seconds": [5, 10],
                 "train.hidden_size": 512, "train.max_minutes": None, "train.lr_schedule": "cosine",
                 "train.lexicon": False}
    apply_overrides(str(params), dvc_set_args(overrides))
    written = yaml.safe_load(params.read_text())
    for key, value in overrides.items():
        section, leaf = key.split(".")
        assert written[section][leaf] == value


@pytest.mark.parametrize("register, prepare, name", [
    ({}, {}, "vamos-en-es"),
    ({"model_name": None}, {"src_lang": "es", "tgt_lang": "en"}, "vamos-es-en"),
    (None, {"tgt_lang": "zh"}, "vamos-en-zh"),
    ({"model_name": "bible-translator"}, {"src_lang": "es", "tgt_lang": "en"}, "bible-translator"),
])
def test_the_registered_model_is_named_after_its_pair_unless_named(tmp_path, register, prepare, name):
    raw = {"prepare": prepare} | ({} if register is None else {"register": register})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert load_params(tmp_path / "params.yaml").registry.model_name == name


def test_an_override_of_the_pair_renames_a_model_the_file_does_not_name(tmp_path):
    (tmp_path / "params.yaml").write_text("register: {model_name: null}\n")
    assert params_with(tmp_path / "params.yaml", {"prepare.tgt_lang": "pt"}).registry.model_name == "vamos-en-pt"
    (tmp_path / "params.yaml").write_text("register: {model_name: mine}\n")
    assert params_with(tmp_path / "params.yaml", {"prepare.tgt_lang": "pt"}).registry.model_name == "mine"


def test_a_prepare_that_is_not_a_section_is_named(tmp_path):
    (tmp_path / "params.yaml").write_text("prepare: [en, es]\n")
    with pytest.raises(ParamsError, match="prepare"):
        load_params(tmp_path / "params.yaml")
