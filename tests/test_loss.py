"""The output projection of the loss (pipeline.loss.output_logits): padded shapes, the same logits."""
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from pipeline.loss import COLUMN_MULTIPLE, ROW_MULTIPLE, output_logits


def test_padded_projection_gives_the_same_logits_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    bias = torch.randn(300, requires_grad=True)
    columns = torch.randperm(300)[:50]
    for cols in (columns, None):
        padded = output_logits(hidden, weight, bias, cols)
        plain = F.linear(hidden, weight, bias) if cols is None else F.linear(hidden, weight[cols], bias[cols])
        assert padded.shape == plain.shape and padded.dtype == torch.float32
        torch.testing.assert_close(padded, plain)
        upstream = torch.randn_like(plain)
        grads = torch.autograd.grad((padded * upstream).sum(), (hidden, weight, bias))
        expected = torch.autograd.grad((plain * upstream).sum(), (hidden, weight, bias))
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want)


def test_every_batch_size_reaches_the_matmul_in_a_few_shapes():
    """Rows and candidates differ in every batch; the matmul must see few distinct shapes, or
    oneDNN builds and caches a new one each step (memory that grows all run long)."""
    generator = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(5000, 8), torch.randn(5000)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as trace:
        for rows in range(1000, 1400, 7):
            width = int(torch.randint(1800, 2100, (1,), generator=generator))
            output_logits(torch.randn(rows, 8), weight, bias, torch.randperm(5000, generator=generator)[:width])
    shapes = {tuple(map(tuple, event.input_shapes[:2])) for event in trace.events() if event.name == "aten::linear"}
    assert all(h[0] % ROW_MULTIPLE == 0 and w[0] % COLUMN_MULTIPLE == 0 for h, w in shapes), shapes
    assert len(shapes) <= 7 * 4, shapes  # 400 rows / 64 (7 values) x 300 candidates / 128 (at most 4)


def test_bf16_autocast_empty_and_already_padded_batches():
    torch.manual_seed(2)
    weight, bias = torch.randn(400, 16), torch.randn(400)
    columns = torch.arange(3, 203)
    for rows in (0, ROW_MULTIPLE, 2 * ROW_MULTIPLE + 1):
        hidden = torch.randn(rows, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = output_logits(hidden, weight, bias, columns)
            plain = F.linear(hidden, weight[columns], bias[columns])
        assert logits.dtype == torch.float32 and logits.shape == (rows, len(columns))
        torch.testing.assert_close(logits, plain.float())
