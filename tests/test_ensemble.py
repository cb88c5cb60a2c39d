"""Ensemble decoding (pipeline.model.ensemble, decode.EnsembleOutput): one model alone, copies of
one model, and two different models against the averaged log-probabilities computed by hand."""
import copy

import numpy as np
import pytest
import torch

from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.decode import OutputLayer, Translator, beam_search
from pipeline.model import ModelConfig, Seq2Seq, load_translator, save_model
from pipeline.model.ensemble import Ensemble
from pipeline.text import SOS_ID, Tokenizer, Vocab
from tests.test_model import make_model, source_batch

runner = CliRunner()


def other_model(seed: int, **kw) -> Seq2Seq:
    torch.manual_seed(seed)
    config = dict(src_vocab=30, tgt_vocab=25, emb_size=8, hidden_size=12, dropout=0.0)
    return Seq2Seq(ModelConfig(**{**config, **kw})).eval()


def outputs(model, beam_size: int, **search):
    hypotheses = beam_search(model, *source_batch(), beam_size=beam_size, max_len_ratio=2.0, **search)
    return [(h.tokens, h.score, h.attention) for h in hypotheses]


@pytest.mark.parametrize("beam_size", [1, 4])
@pytest.mark.parametrize("copies", [1, 2])
def test_an_ensemble_of_one_model_or_its_copies_decodes_as_the_model(beam_size, copies):
    """One member, or two identical ones (their mean is exact), give the model's own outputs bit for bit."""
    model = make_model()
    ensemble = Ensemble([model] + [copy.deepcopy(model) for _ in range(copies - 1)]).eval()
    for (tokens, score, attention), (e_tokens, e_score, e_attention) in zip(outputs(model, beam_size),
                                                                            outputs(ensemble, beam_size)):
        assert e_tokens == tokens and e_score == score
        assert np.array_equal(e_attention, attention)


def test_three_copies_agree_within_rounding():
    model = make_model()
    single, triple = outputs(model, 4), outputs(Ensemble([model] * 3).eval(), 4)
    assert [t for t, _, _ in triple] == [t for t, _, _ in single]
    assert [s for _, s, _ in triple] == pytest.approx([s for _, s, _ in single], abs=1e-5)


@torch.no_grad()
def test_two_models_score_each_word_by_their_mean_log_probability():
    """The first greedy word of an ensemble of two different models is the argmax of the members'
    averaged log-probabilities, computed here from each model alone; the members disagree on it."""
    first, second = other_model(1), other_model(2, hidden_size=16)  # sizes may differ, vocabularies not
    src, src_len = source_batch()
    prev = torch.full((src.size(0),), SOS_ID)
    member_log_probs = []
    for model in (first, second):
        memory, state = model.encode(src, src_len)
        attentional, _, _ = model.decoder.step(prev, state, memory)
        member_log_probs.append(OutputLayer(model).log_probs(attentional))
    expected = ((member_log_probs[0] + member_log_probs[1]) / 2).max(dim=1)
    hypotheses = beam_search(Ensemble([first, second]).eval(), src, src_len, beam_size=1, max_len_ratio=2.0)
    assert [h.tokens[0] for h in hypotheses] == expected.indices.tolist()
    each_alone = [beam_search(m, src, src_len, beam_size=1, max_len_ratio=2.0) for m in (first, second)]
    assert [h.tokens for h in each_alone[0]] != [h.tokens for h in each_alone[1]]


def test_members_must_share_vocabulary_sizes():
    with pytest.raises(ValueError, match="different vocabulary sizes"):
        Ensemble([other_model(1), other_model(2, tgt_vocab=26)])
    with pytest.raises(ValueError, match="at least one model"):
        Ensemble([])


def save(path, model, tgt_words=("u", "v", "w", "x", "y", "z")):
    src_vocab = Vocab([chr(ord("a") + i) for i in range(26)])
    save_model(path, model, src_vocab, Vocab(list(tgt_words) + [f"t{i}" for i in range(15)]),
               Tokenizer("en", True), Tokenizer("es", False))
    return path


def test_packed_file_loads_as_the_ensemble_and_translates_as_it(tmp_path):
    first, second = other_model(1), other_model(2, hidden_size=16)
    result = runner.invoke(app, ["ensemble", str(save(tmp_path / "a.pt", first)), str(save(tmp_path / "b.pt", second)),
                                 "--output", str(tmp_path / "ab.pt")])
    assert result.exit_code == 0 and "an ensemble of 2 models" in result.output, result.output
    loaded = load_translator(tmp_path / "ab.pt")
    assert isinstance(loaded.model, Ensemble) and len(loaded.model.members) == 2
    in_memory = Ensemble([first, second]).eval()
    for (tokens, score, attention), (e_tokens, e_score, e_attention) in zip(outputs(loaded.model, 3),
                                                                            outputs(in_memory, 3)):
        assert tokens == e_tokens and score == e_score and np.array_equal(attention, e_attention)
    same = Translator(in_memory, loaded.src_tok, loaded.tgt_tok, loaded.src_vocab, loaded.tgt_vocab)
    assert loaded.translate(["a b c d", "e f"]) == same.translate(["a b c d", "e f"])
    # A packed ensemble packs again as its members; a single model file stays what it was.
    runner.invoke(app, ["ensemble", str(tmp_path / "ab.pt"), str(tmp_path / "a.pt"), "-o", str(tmp_path / "aba.pt")])
    assert len(load_translator(tmp_path / "aba.pt").model.members) == 3
    assert isinstance(load_translator(tmp_path / "a.pt").model, Seq2Seq)


def test_models_of_other_vocabularies_are_refused_naming_the_file(tmp_path):
    first = save(tmp_path / "a.pt", other_model(1))
    other = save(tmp_path / "b.pt", other_model(2), tgt_words=("u", "v", "w", "x", "y", "q"))
    result = runner.invoke(app, ["ensemble", str(first), str(other), "-o", str(tmp_path / "ab.pt")])
    assert result.exit_code == 2 and "b.pt: its vocabularies differ" in result.output, result.output
    assert not (tmp_path / "ab.pt").exists()


def test_the_served_model_takes_an_ensemble_file_as_it_is(tmp_path):
    """The logged model and `vamos translate --model` load through the same TranslatorModel."""
    from pipeline.config import Params
    from pipeline.serving import load_model_file

    first, second = save(tmp_path / "a.pt", other_model(1)), save(tmp_path / "b.pt", other_model(2, hidden_size=16))
    runner.invoke(app, ["ensemble", str(first), str(second), "-o", str(tmp_path / "ab.pt")])
    served = load_model_file(tmp_path / "ab.pt", Params())
    assert isinstance(served.translator.model, Ensemble)
    lines = ["a b c", "d e f g"]
    expected = Translator(Ensemble([other_model(1), other_model(2, hidden_size=16)]), served.translator.src_tok,
                          served.translator.tgt_tok, served.translator.src_vocab, served.translator.tgt_vocab)
    assert served.predict(None, lines, {"beam_size": 3}) == expected.translate(lines, beam_size=3,
                                                                              **served.search)
