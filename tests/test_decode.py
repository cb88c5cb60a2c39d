import itertools
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import pytest
import torch

from pipeline.decode import (OutputLayer, Translator, beam_search, greedy_search, length_penalty,
                             replace_unknowns, search_beams)
from pipeline.model.attention import Memory
from pipeline.text import EOS_ID, PAD_ID, SOS_ID, UNK_ID, Tokenizer, Vocab
from tests.test_model import make_model, source_batch


def translator() -> Translator:
    model = make_model(src_vocab=12, tgt_vocab=10)
    src_vocab = Vocab(["a", "b", "c", "d", "e", "f", "g", "h"])
    tgt_vocab = Vocab(["u", "v", "w", "x", "y", "z"])
    return Translator(model, Tokenizer("en", True), Tokenizer("es", False), src_vocab, tgt_vocab)


class NoState(NamedTuple):
    rows: torch.Tensor

    def select(self, index: torch.Tensor) -> "NoState":
        return NoState(self.rows.index_select(0, index))


class BigramModel:
    """A model whose next-word log-probabilities depend only on the previous word, from a table we
    write, so every sequence's probability is known. It has the interface the searches use: encode,
    decoder.step (attention uniform over the real source positions) and logits."""

    def __init__(self, probs: torch.Tensor):
        probs = probs.clone()
        probs[:, [PAD_ID, SOS_ID]] = 0.0  # the searches renormalise over the words they can emit
        self.table = torch.log(probs / probs.sum(1, keepdim=True))
        self.decoder = self
        self.config = SimpleNamespace(right_to_left=False)  # it reads left to right

    def encode(self, src, src_len):
        mask = torch.arange(src.size(1)).unsqueeze(0) < src_len.unsqueeze(1)
        values = mask.float().unsqueeze(2)
        return Memory(values, values, mask), NoState(torch.zeros(src.size(0)))

    def step(self, prev, state, memory):
        weights = memory.mask.float() / memory.mask.sum(1, keepdim=True)
        return prev, state, weights

    def logits(self, attentional):
        return self.table[attentional]

    def log_prob(self, tokens: list[int]) -> float:
        """log p(tokens <eos>)."""
        path = [SOS_ID, *tokens, EOS_ID]
        return float(sum(self.table[a, b] for a, b in zip(path, path[1:])))


def bigram(vocab: int, transitions: dict[int, dict[int, float]], rest: float = 1e-9) -> BigramModel:
    probs = torch.full((vocab, vocab), rest, dtype=torch.float64)
    for prev, nexts in transitions.items():
        for token, p in nexts.items():
            probs[prev, token] = p
    return BigramModel(probs.float())


def one_word_source():
    return torch.tensor([[5]]), torch.tensor([1])


def test_wide_beam_finds_the_best_sequence_by_exhaustive_enumeration():
    """Six words (two real), five steps: a beam wider than all candidates of a step holds every
    prefix, so it must return the best of all 121 possible outputs under the length penalty."""
    torch.manual_seed(3)
    model = BigramModel(torch.softmax(2 * torch.randn(6, 6), dim=1))
    src, src_len = one_word_source()  # max_len_ratio 0: a horizon of 5 steps, <eos> included
    emittable = [UNK_ID, 4, 5]
    for alpha in (0.0, 1.0, 2.0):
        outputs = [list(seq) for n in range(5) for seq in itertools.product(emittable, repeat=n)]
        best = max(outputs, key=lambda seq: model.log_prob(seq) / length_penalty(len(seq) + 1, alpha))
        hyp = search_beams(model, src, src_len, beam_size=len(emittable) ** 3 * 4, alpha=alpha, max_len_ratio=0.0)[0]
        assert hyp.tokens == best
        assert hyp.score == pytest.approx(model.log_prob(best) / length_penalty(len(best) + 1, alpha), abs=1e-5)


def test_a_complete_sentence_beats_repeats_cut_off_at_the_length_limit():
    """The likely path repeats a word and almost never ends (p(eos) = 1e-6): at the limit it must
    pay for <eos>, and lose to the less likely but complete path."""
    a, b, c, d = 4, 5, 6, 7
    model = bigram(8, {SOS_ID: {a: 0.6, b: 0.4}, a: {a: 1 - 1e-6, EOS_ID: 1e-6}, b: {c: 0.9, d: 0.1},
                       c: {EOS_ID: 0.99, d: 0.01}, d: {EOS_ID: 1.0}})
    src, src_len = one_word_source()
    for beam in (2, 3, 5):
        hyp = beam_search(model, src, src_len, beam_size=beam, alpha=1.0, max_len_ratio=1.0)[0]
        assert hyp.tokens == [b, c]
        assert hyp.score == pytest.approx(model.log_prob([b, c]) / length_penalty(3, 1.0), abs=1e-5)
    repeats = greedy_search(model, src, src_len, max_len_ratio=1.0)[0]
    assert repeats.tokens == [a] * 5  # greedy stops at the limit too, and pays for <eos> there
    assert repeats.score == pytest.approx(model.log_prob([a] * 5), abs=1e-4)


def test_length_penalty_grows_with_length_and_alpha_favours_longer_outputs():
    assert length_penalty(1, 1.0) == 1.0 and length_penalty(10, 0.0) == 1.0
    assert length_penalty(2, 1.0) < length_penalty(5, 1.0) < length_penalty(5, 2.0)
    x, y, z, w = 4, 5, 6, 7
    model = bigram(8, {SOS_ID: {x: 0.45, y: 0.42, EOS_ID: 0.13}, x: {EOS_ID: 1.0}, y: {z: 1.0},
                       z: {w: 1.0}, w: {EOS_ID: 1.0}})
    src, src_len = one_word_source()
    # log p: [x] -0.80, [y z w] -0.87: the short one wins unnormalised, the long one at alpha 1.
    assert beam_search(model, src, src_len, beam_size=3, alpha=0.0)[0].tokens == [x]
    assert beam_search(model, src, src_len, beam_size=3, alpha=1.0)[0].tokens == [y, z, w]


def test_beam_code_with_a_beam_of_one_is_greedy():
    """search_beams itself: beam_search hands a beam of one to greedy_search, so through it this
    would compare greedy with itself. At alpha 0 the scores are unnormalised, as greedy's."""
    x, y, z, w = 4, 5, 6, 7
    # Normalised (alpha 1), a beam of three finds [y z w]; one beam keeps only the likelier first word.
    ends_early = bigram(8, {SOS_ID: {x: 0.45, y: 0.42, EOS_ID: 0.13}, x: {EOS_ID: 1.0}, y: {z: 1.0},
                            z: {w: 1.0}, w: {EOS_ID: 1.0}})
    assert search_beams(ends_early, *one_word_source(), beam_size=3, alpha=1.0)[0].tokens == [y, z, w]
    for model, (src, src_len) in ((ends_early, one_word_source()), (make_model(), source_batch())):
        greedy = greedy_search(model, src, src_len)
        beam = search_beams(model, src, src_len, beam_size=1, alpha=0.0)
        assert [h.tokens for h in beam] == [h.tokens for h in greedy]
        assert [h.score for h in beam] == pytest.approx([h.score for h in greedy], abs=1e-5)
        for b, g in zip(beam, greedy):
            assert np.allclose(b.attention, g.attention, atol=1e-6)


def test_beam_hypotheses_are_well_formed():
    model = make_model()
    src, src_len = source_batch()
    for hyp, length in zip(beam_search(model, src, src_len, beam_size=4, max_len_ratio=2.0), [5, 2]):
        assert 3 not in hyp.tokens  # <eos> ends a hypothesis, it is not part of it
        assert hyp.attention.shape == (len(hyp.tokens), length)
        assert np.allclose(hyp.attention.sum(1), 1, atol=1e-5)
        assert len(hyp.tokens) <= length * 2.0 + 5


@pytest.mark.parametrize("beam_size", [1, 4])
def test_back_pointers_give_each_output_its_own_attention_and_score(beam_size):
    """Read back through the back-pointers, a hypothesis has the attention and the log-probability
    that teacher-forcing its tokens gives."""
    model = make_model(tgt_vocab=8)
    src, src_len = source_batch()
    for b, hyp in enumerate(beam_search(model, src, src_len, beam_size=beam_size, max_len_ratio=1.0)):
        tgt_in = torch.tensor([[SOS_ID, *hyp.tokens]])
        with torch.no_grad():
            attentional, weights = model(src[b : b + 1, : src_len[b]], src_len[b : b + 1], tgt_in)
            logits = model.logits(attentional[0])
            logits[:, [PAD_ID, SOS_ID]] = float("-inf")
            log_probs = torch.log_softmax(logits, dim=-1)
        log_p = float(log_probs[torch.arange(len(hyp.tokens) + 1), torch.tensor([*hyp.tokens, EOS_ID])].sum())
        penalty = 1.0 if beam_size == 1 else length_penalty(len(hyp.tokens) + 1, 1.0)
        assert np.allclose(hyp.attention, weights[0, : len(hyp.tokens)].numpy(), atol=1e-5)
        assert hyp.score == pytest.approx(log_p / penalty, abs=1e-4)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("beam_size", [1, 3, 5])
def test_translations_do_not_depend_on_batch_composition(beam_size, precision):
    """Also past 32 rows (8 sentences x beam 5), where fp32 decoding steps switch from lstm_cell to
    nn.LSTM; in bf16 the LSTMs step with lstm_cell and fp32 states whatever the batch."""
    t = translator()
    sentences = [["a", "b"], ["c", "d", "e", "f", "g", "h", "a"], ["h"], ["b", "b", "c"],
                 ["d", "a"], ["e", "f", "g"], ["h", "h", "a", "b"], ["c"]]
    together = t.translate_tokens(sentences, beam_size=beam_size, batch_size=8, precision=precision)
    for sentence, (words, attention) in zip(sentences, together):
        alone_words, alone_attention = t.translate_tokens([sentence], beam_size=beam_size, precision=precision)[0]
        assert words == alone_words
        assert np.allclose(attention, alone_attention, atol=1e-5)


@pytest.mark.parametrize("beam_size", [1, 2, 4])
def test_pad_and_sos_are_never_emitted_even_when_most_likely(beam_size):
    table = bigram(8, {row: {PAD_ID: 0.5, SOS_ID: 0.3, 4: 0.1, 5: 0.05, EOS_ID: 0.05} for row in range(8)})
    table.table[:, [PAD_ID, SOS_ID]] = torch.log(torch.tensor([0.5, 0.3]))  # most of the mass
    real = make_model(tgt_vocab=8)
    with torch.no_grad():
        real.generator.bias[[PAD_ID, SOS_ID]] += 50.0
    src, src_len = source_batch()
    for model in (table, real):
        for hyp in beam_search(model, src, src_len, beam_size=beam_size):
            assert not {PAD_ID, SOS_ID} & set(hyp.tokens)
            assert np.isfinite(hyp.score)


def test_unknown_words_are_copied_from_the_attended_source():
    attention = np.array([[0.1, 0.9], [0.8, 0.2]])
    assert replace_unknowns(["<unk>", "casa"], attention, ["the", "naomi"]) == ["naomi", "casa"]


def test_translate_text_end_to_end_returns_strings():
    outputs = translator().translate(["A b c.", "H"], beam_size=2)
    assert len(outputs) == 2 and all(isinstance(o, str) for o in outputs)


def test_bf16_output_layer_scores_as_fp32_and_follows_weight_updates():
    model = make_model(src_vocab=12, tgt_vocab=40, emb_size=16, hidden_size=16)
    torch.manual_seed(1)
    states, at_limit = torch.randn(6, 16), torch.zeros(6, dtype=torch.bool)

    def scores(dtype):
        values, positions = OutputLayer(model, dtype=dtype).best(states, at_limit, 40 - 2)
        return values.gather(1, positions.argsort(1))  # every emittable word, in vocabulary order

    before = scores(torch.bfloat16)
    assert torch.allclose(before, scores(torch.float32), rtol=0.01, atol=0.03)
    with torch.no_grad():  # an optimizer step updates the weights in place: the bf16 copy must follow
        model.generator.weight.add_(torch.randn_like(model.generator.weight))
    after = scores(torch.bfloat16)
    assert not torch.allclose(after, before, atol=0.03)
    assert torch.allclose(after, scores(torch.float32), rtol=0.01, atol=0.03)



def test_unk_penalty_makes_a_likely_unknown_word_lose_to_a_real_one():
    a = 4
    model = bigram(8, {SOS_ID: {UNK_ID: 0.55, a: 0.45}, UNK_ID: {EOS_ID: 1.0}, a: {EOS_ID: 1.0}})
    src, src_len = one_word_source()
    for beam in (1, 3):
        assert beam_search(model, src, src_len, beam_size=beam)[0].tokens == [UNK_ID]
        penalised = beam_search(model, src, src_len, beam_size=beam, unk_penalty=1.0)[0]
        assert penalised.tokens == [a]
        # Normalised over every word as before: [a] scores its own log-probability.
        assert penalised.score == pytest.approx(model.log_prob([a]) / (length_penalty(2, 1.0) if beam > 1 else 1), abs=1e-5)

