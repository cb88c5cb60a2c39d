"""Ensemble decoding (pipeline.model.ensemble, decode.EnsembleOutput): one model alone, copies of
one model, and two different models against the averaged log-probabilities computed by hand."""
import copy

import numpy as np
import pytest
import torch

from typer.testing import CliRunner

from pipeline.cli import app
from pipeline import decode
from pipeline.decode import (OutputLayer, Translator, beam_history, beam_search, length_penalty, search_beams,
                             sequence_log_probs)
from pipeline.model import ModelConfig, Seq2Seq, load_translator, save_model
from pipeline.model.ensemble import Ensemble
from pipeline.text import EOS_ID, SOS_ID, Tokenizer, Vocab
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


# ---------------------------------------------------------------- right-to-left models and reranking

def backward_model(seed: int = 3, **kw) -> Seq2Seq:
    return other_model(seed, right_to_left=True, **kw)


@torch.no_grad()
def stepped_log_prob(model: Seq2Seq, src, src_len, row: int, tokens: list[int]) -> float:
    """log p(tokens, <eos>) of one row, the decoder stepped word by word (backwards for a
    right-to-left model): an independent reading of what sequence_log_probs computes batched."""
    words = (tokens[::-1] if model.config.right_to_left else tokens) + [EOS_ID]
    memory, state = model.encode(src[row:row + 1], src_len[row:row + 1])
    prev, total = torch.tensor([SOS_ID]), 0.0
    for word in words:
        attentional, state, _ = model.decoder.step(prev, state, memory)
        total += float(OutputLayer(model).log_probs(attentional)[0, word])
        prev = torch.tensor([word])
    return total


def test_a_right_to_left_model_alone_reads_its_output_backwards():
    model = backward_model()
    src, src_len = source_batch()
    raw = search_beams(model, src, src_len, beam_size=3)
    read = beam_search(model, src, src_len, beam_size=3)
    for r, h in zip(raw, read):
        assert h.tokens == r.tokens[::-1] and h.score == r.score
        assert np.array_equal(h.attention, r.attention[::-1])
    assert any(len(h.tokens) > 1 for h in read)  # the reversal is seen


def test_the_n_best_list_is_sorted_bounded_and_led_by_the_beams_best():
    model = make_model()
    src, src_len = source_batch()
    n_best = beam_history(model, src, src_len, beam_size=4, n_best=4).n_best_lists(src_len)
    best = search_beams(model, src, src_len, beam_size=4)
    for hyps, one in zip(n_best, best):
        assert 2 <= len(hyps) <= 4
        assert hyps[0].tokens == one.tokens and hyps[0].score == one.score
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == len(hyps)


def test_sequence_log_probs_match_the_decoder_stepped_word_by_word(monkeypatch):
    src, src_len = source_batch()
    targets = [[3, 4, 5], [6]]
    for model in (make_model(), backward_model()):
        batched = sequence_log_probs(model, src, src_len, targets).tolist()
        assert batched == pytest.approx([stepped_log_prob(model, src, src_len, i, t) for i, t in enumerate(targets)],
                                        abs=1e-5)
        monkeypatch.setattr(decode, "SCORED_FLOATS", 1)  # one row per pass: the same scores
        assert sequence_log_probs(model, src, src_len, targets).tolist() == pytest.approx(batched, abs=1e-6)
        monkeypatch.undo()


def test_right_to_left_members_rerank_the_forward_n_best_list():
    """[left-to-right, right-to-left]: the forward model searches alone, and each sentence's output
    is the n-best candidate of the best mean of the two length-normalised scores, computed here by
    stepping the backward model word by word."""
    forward, backward = make_model(), backward_model(src_vocab=30, tgt_vocab=25)
    ensemble = Ensemble([forward, backward]).eval()
    assert list(ensemble.members) == [forward] and list(ensemble.rerankers) == [backward]
    src, src_len = source_batch()
    alpha = 1.0
    n_best = beam_history(forward, src, src_len, beam_size=4, alpha=alpha, n_best=4).n_best_lists(src_len)
    chosen = beam_search(ensemble, src, src_len, beam_size=4, alpha=alpha)
    for row, (hyps, out) in enumerate(zip(n_best, chosen)):
        combined = [(h.score + stepped_log_prob(backward, src, src_len, row, h.tokens)
                     / length_penalty(len(h.tokens) + 1, alpha)) / 2 for h in hyps]
        assert out.tokens == hyps[int(np.argmax(combined))].tokens
    alone = beam_search(forward, src, src_len, beam_size=4, alpha=alpha)
    assert [h.tokens for h in chosen] != [h.tokens for h in alone]  # the reranking changed an output
    # Greedy decoding has no list to rerank: the forward model's own output.
    assert [h.tokens for h in beam_search(ensemble, src, src_len, beam_size=1)] == \
           [h.tokens for h in beam_search(forward, src, src_len, beam_size=1)]
    # Backward models alone search (backwards), reranking nothing.
    alone = Ensemble([backward]).eval()
    assert len(alone.rerankers) == 0
    assert [h.tokens for h in beam_search(alone, src, src_len, beam_size=3)] == \
           [h.tokens for h in beam_search(backward, src, src_len, beam_size=3)]


def test_a_packed_reranker_survives_saving(tmp_path):
    forward, backward = other_model(1), backward_model()
    runner.invoke(app, ["ensemble", str(save(tmp_path / "f.pt", forward)), str(save(tmp_path / "b.pt", backward)),
                        "-o", str(tmp_path / "fb.pt")])
    loaded = load_translator(tmp_path / "fb.pt").model
    assert len(loaded.members) == 1 and len(loaded.rerankers) == 1 and loaded.rerankers[0].config.right_to_left
    assert [h.tokens for h in outputs_of(loaded)] == [h.tokens for h in outputs_of(Ensemble([forward, backward]).eval())]
    # A forward model's file has no right_to_left key: files saved before the option are unchanged.
    assert "right_to_left" not in torch.load(tmp_path / "f.pt", weights_only=True)["config"]


def outputs_of(model):
    return beam_search(model, *source_batch(), beam_size=3, max_len_ratio=2.0)
