import pytest
import torch
import torch.nn.functional as F

from pipeline.data import pad
from pipeline.model import ModelConfig, Seq2Seq, load_model, save_model
from pipeline.text import PAD_ID, SOS_ID, Tokenizer, Vocab
from pipeline.loss import sampled_logits, sequence_loss


def make_model(attention="general", **kw) -> Seq2Seq:
    torch.manual_seed(0)
    config = dict(src_vocab=30, tgt_vocab=25, emb_size=8, hidden_size=12, attention=attention, dropout=0.0)
    config.update(kw)
    return Seq2Seq(ModelConfig(**config)).eval()


def source_batch():
    src = pad([[5, 6, 7, 8, 9], [10, 11]])
    return src, torch.tensor([5, 2])


@pytest.mark.parametrize("attention", ["dot", "general", "bahdanau"])
def test_attention_is_a_distribution_over_real_positions(attention):
    model = make_model(attention)
    src, src_len = source_batch()
    tgt_in = torch.tensor([[SOS_ID, 4, 5], [SOS_ID, 6, 0]])
    _, weights = model(src, src_len, tgt_in)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 3), atol=1e-5)
    assert torch.all(weights[1, :, 2:] == 0)  # padding gets no attention
    assert torch.all(weights[1, :, :2] > 0)


def test_attention_moves_when_the_source_changes():
    model = make_model()
    src, src_len = source_batch()
    tgt_in = torch.tensor([[SOS_ID, 4], [SOS_ID, 6]])
    _, before = model(src, src_len, tgt_in)
    changed = src.clone()
    changed[0, 2] = 20
    _, after = model(changed, src_len, tgt_in)
    assert not torch.allclose(before[0], after[0])
    assert torch.allclose(before[1], after[1], atol=1e-6)  # the other sentence is untouched


def test_outputs_do_not_depend_on_padding_or_batch_mates():
    model = make_model(bidirectional=True, encoder_layers=2, decoder_layers=2)
    alone_src, alone_len = pad([[10, 11]]), torch.tensor([2])
    tgt_in = torch.tensor([[SOS_ID, 6, 7]])
    alone, _ = model(alone_src, alone_len, tgt_in)
    src, src_len = source_batch()
    batched, _ = model(src, src_len, torch.tensor([[SOS_ID, 4, 5], [SOS_ID, 6, 7]]))
    assert torch.allclose(alone[0], batched[1], atol=1e-5)


def teacher_forced(model):
    """The toy batch's attentional states and its targets (5 real words, one row padded)."""
    src, src_len = source_batch()
    attentional, _ = model(src, src_len, torch.tensor([[SOS_ID, 4, 5], [SOS_ID, 6, 0]]))
    return attentional, torch.tensor([[4, 5, 3], [6, 3, 0]])


def test_sampled_softmax_trains_and_full_softmax_evaluates():
    model = make_model(tie_embeddings=True).train()
    attentional, tgt_out = teacher_forced(model)
    loss, tokens = sequence_loss(model, attentional, tgt_out, negatives=5, label_smoothing=0.1)
    assert tokens == 5 and torch.isfinite(loss)
    loss.backward()
    assert model.encoder.embedding.weight.grad.abs().sum() > 0
    assert model.generator.weight is model.decoder.embedding.weight
    model.eval()
    full, _ = sequence_loss(model, attentional.detach(), tgt_out, negatives=5, label_smoothing=0.0)
    logits = model.generator(attentional.detach()[tgt_out != 0])
    expected = torch.nn.functional.cross_entropy(logits, tgt_out[tgt_out != 0], reduction="sum")
    assert torch.allclose(full, expected)


def test_teacher_forcing_below_one_feeds_predictions():
    model = make_model().train()
    src, src_len = source_batch()
    tgt_in = torch.tensor([[SOS_ID, 4, 5, 6], [SOS_ID, 6, 7, 0]])
    torch.manual_seed(1)
    forced, _ = model(src, src_len, tgt_in, teacher_forcing=1.0)
    torch.manual_seed(1)
    free, _ = model(src, src_len, tgt_in, teacher_forcing=0.0)
    assert torch.allclose(forced[:, 0], free[:, 0]) and not torch.allclose(forced[:, 1:], free[:, 1:])


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = make_model()
    vocab_src, vocab_tgt = Vocab([f"s{i}" for i in range(26)]), Vocab([f"t{i}" for i in range(21)])
    save_model(tmp_path / "m.pt", model, vocab_src, vocab_tgt, Tokenizer("en", True), Tokenizer("es", False))
    loaded, src_vocab, tgt_vocab, src_tok, tgt_tok, _ = load_model(tmp_path / "m.pt")
    assert src_vocab.itos == vocab_src.itos and tgt_tok == Tokenizer("es", False)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_sampled_softmax_estimates_the_normaliser_without_bias():
    """The log-Q correction makes the candidates' exp-logits an unbiased estimate of the full
    softmax's normaliser, although each set holds a fraction of the vocabulary; without it the
    estimate is far too small and rare gold words look likely."""
    torch.manual_seed(0)
    vocab, dim = 2000, 16
    weight, bias = torch.randn(vocab, dim) * 0.25, torch.randn(vocab) * 0.25
    hidden, gold = torch.randn(3, dim), torch.tensor([5, 300, 1900])  # a frequent, a middling, a rare word
    full = torch.logsumexp(F.linear(hidden, weight, bias), 1).exp()
    estimates, sizes = [], []
    for _ in range(300):
        logits, columns = sampled_logits(hidden, gold, weight, bias, negatives=200)
        # Close, not equal: the padded projection and this one are matmuls of other shapes.
        rows = torch.arange(3)
        torch.testing.assert_close(logits[rows, columns], F.linear(hidden, weight, bias)[rows, gold])
        estimates.append(torch.logsumexp(logits, 1).exp())
        sizes.append(logits.size(1))
    assert max(sizes) < vocab / 5
    assert torch.allclose(torch.stack(estimates).mean(0), full, rtol=0.03)


def test_sampled_softmax_tends_to_the_full_softmax():
    torch.manual_seed(0)
    model = make_model(tie_embeddings=False).train()
    hidden = torch.randn(1, 6, model.generator.in_features)
    targets = torch.tensor([[4, 5, 12, 20, 24, 3]])
    full, _ = sequence_loss(model.eval(), hidden, targets, negatives=0, label_smoothing=0.0)
    sampled, _ = sequence_loss(model.train(), hidden, targets, negatives=24, label_smoothing=0.0)
    assert sampled.item() == pytest.approx(full.item(), rel=0.1)


def test_sampled_softmax_pushes_pad_and_sos_down():
    model = make_model(tie_embeddings=False).train()
    attentional, tgt_out = teacher_forced(model)
    loss, _ = sequence_loss(model, attentional, tgt_out, negatives=5, label_smoothing=0.1)
    assert torch.isfinite(loss)
    loss.backward()
    bias_grad = model.generator.bias.grad
    assert bias_grad[0] > 0 and bias_grad[2] > 0  # gradient descent lowers <pad> and <sos>


@pytest.mark.parametrize("attention", ["dot", "general", "bahdanau"])
def test_decoder_without_input_feeding_runs_in_one_call_as_it_steps(attention):
    """Teacher-forced, the one-call decoder equals the step-by-step one that greedy and beam use."""
    model = make_model(attention, input_feeding=False, decoder_layers=2)
    src, src_len = source_batch()
    tgt_in = torch.tensor([[SOS_ID, 4, 5, 6], [SOS_ID, 6, 7, 0]])
    parallel, parallel_weights = model(src, src_len, tgt_in)
    memory, state = model.encode(src, src_len)
    stepped = []
    for t in range(tgt_in.size(1)):
        attentional, state, weights = model.decoder.step(tgt_in[:, t], state, memory)
        stepped.append(attentional)
        assert torch.allclose(parallel_weights[:, t], weights, atol=1e-6)
        state = state.select(torch.tensor([0, 1]))  # beam search's reordering keeps working
    assert torch.allclose(parallel, torch.stack(stepped, 1), atol=1e-5)
    assert model.decoder.rnn.input_size == model.config.emb_size  # no attentional state fed back


@pytest.mark.parametrize("copies", [1, 20])  # 2 rows: decoding's lstm_cell path; 40: nn.LSTM's
def test_input_feeding_decoder_embeds_once_as_it_steps(copies):
    """Teacher-forced training embeds the whole target at once (one embedding gradient, not one per
    step) and must compute what decoding's steps compute."""
    model = make_model(input_feeding=True, decoder_layers=2, dropout=0.0).train()
    src, src_len = source_batch()
    src, src_len = src.repeat(copies, 1), src_len.repeat(copies)
    tgt_in = torch.tensor([[SOS_ID, 4, 5, 6], [SOS_ID, 6, 7, 0]]).repeat(copies, 1)
    parallel, parallel_weights = model(src, src_len, tgt_in)
    model.eval()
    with torch.no_grad():
        memory, state = model.encode(src, src_len)
        for t in range(tgt_in.size(1)):
            attentional, state, weights = model.decoder.step(tgt_in[:, t], state, memory)
            assert torch.allclose(parallel[:, t], attentional, atol=1e-5)
            assert torch.allclose(parallel_weights[:, t], weights, atol=1e-5)


def test_model_without_input_feeding_round_trips_and_decodes(tmp_path):
    from pipeline.decode import greedy_search

    model = make_model(input_feeding=False)
    vocab_src, vocab_tgt = Vocab([f"s{i}" for i in range(26)]), Vocab([f"t{i}" for i in range(21)])
    save_model(tmp_path / "m.pt", model, vocab_src, vocab_tgt, Tokenizer("en", True), Tokenizer("es", False))
    loaded = load_model(tmp_path / "m.pt")[0]
    assert loaded.config.input_feeding is False
    src, src_len = source_batch()
    assert len(greedy_search(loaded, src, src_len)) == 2


@pytest.mark.parametrize("layers,input_feeding", [(1, False), (2, True)])
def test_decoding_step_by_lstm_cell_matches_nn_lstm(monkeypatch, layers, input_feeding):
    import pipeline.model.decoder as decoder

    model = make_model(decoder_layers=layers, encoder_layers=layers, input_feeding=input_feeding)
    memory, state = model.encode(*source_batch())
    prev = torch.tensor([4, 5])
    with torch.no_grad():
        by_cell = model.decoder.step(prev, state, memory)  # 2 rows: lstm_cell
        monkeypatch.setattr(decoder, "CELL_ROWS", 0)
        by_lstm = model.decoder.step(prev, state, memory)
    for a, b in zip([by_cell[0], *by_cell[1], by_cell[2]], [by_lstm[0], *by_lstm[1], by_lstm[2]]):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)])
def test_encoder_by_steps_matches_the_packed_lstm(layers, bidirectional):
    """The step-wise encoder (decoding under CPU bf16 autocast) computes what nn.LSTM computes over
    packed sequences: the same states at real positions, zeros at padding, the same final states,
    for any order of lengths, one-word sentences and an empty one (one <pad>, length 1)."""
    model = make_model(encoder_layers=layers, bidirectional=bidirectional)
    src = pad([[5, 6, 7, 8, 9], [10], [12, 13, 14], [PAD_ID], [15, 16]])
    src_len = torch.tensor([5, 1, 3, 1, 2])
    with torch.no_grad():
        packed, (h, c) = model.encoder(src, src_len)
        by_steps, (h_steps, c_steps) = model.encoder.forward_by_steps(model.encoder.embedding(src), src_len)
    assert by_steps.shape == packed.shape
    assert torch.all(by_steps[1, 1:] == 0) and torch.all(by_steps[4, 2:] == 0)
    for a, b in ((by_steps, packed), (h_steps, h), (c_steps, c)):
        assert torch.allclose(a, b, atol=1e-6)


def test_bf16_decoding_keeps_fp32_states_close_to_fp32():
    """Sentences of one length, where nn.LSTM under autocast would turn its states bf16."""
    model = make_model(bidirectional=True, encoder_layers=2, decoder_layers=2)
    src, src_len = pad([[5, 6, 7], [10, 11, 12]]), torch.tensor([3, 3])
    with torch.no_grad():
        memory, state = model.encode(src, src_len)
        step = model.decoder.step(torch.tensor([4, 5]), state, memory)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            memory16, state16 = model.encode(src, src_len)
            step16 = model.decoder.step(torch.tensor([4, 5]), state16, memory16)
    assert memory16.values.dtype == state16.c.dtype == step16[1].c.dtype == torch.float32
    assert memory16.keys.dtype == torch.bfloat16  # the products run in bf16
    for a, b in ((memory16.values, memory.values), (step16[0], step[0]), (step16[1].c, step[1].c)):
        assert torch.allclose(a.float(), b, atol=0.05)
        assert not torch.equal(a.float(), b)


def test_training_under_autocast_keeps_nn_lstm(monkeypatch):
    """The step-wise paths are for decoding only: amp training keeps nn.LSTM and its dropout."""
    from pipeline.model.decoder import Decoder
    from pipeline.model.encoder import Encoder

    def refuse(*args, **kwargs):
        raise AssertionError("a step-wise path in training")

    monkeypatch.setattr(Encoder, "forward_by_steps", refuse)
    monkeypatch.setattr(Decoder, "cell_step", refuse)
    model = make_model(bidirectional=True, encoder_layers=2, decoder_layers=2, input_feeding=True).train()
    src, src_len = source_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attentional, _ = model(src, src_len, torch.tensor([[SOS_ID, 4, 5], [SOS_ID, 6, 0]]))
    assert attentional.shape[:2] == (2, 3)
