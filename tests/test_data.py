"""The loader: memory-mapped batches equal the in-memory ones of the code before them, and the
vectorised batch plan equals the row-by-row loop it replaced, on every seed and budget."""
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import token_ids
from pipeline.data import ParallelData, group_starts, prefetched
from pipeline.text import EOS_ID, PAD_ID, SOS_ID, Vocab


def reference_batches(target_lengths: np.ndarray, batch_tokens: int, seed: int | None) -> list[np.ndarray]:
    """The batch plan as ParallelData.batches computed it before it was vectorised (kept verbatim)."""
    lengths = np.array([n + 1 for n in target_lengths], dtype=np.float64)
    rng = np.random.default_rng(seed) if seed is not None else None
    keys = lengths + (rng.uniform(0, 1, len(lengths)) if rng is not None else 0)
    order = np.argsort(keys, kind="stable")
    groups, current, longest = [], [], 0
    for row in order:
        longest_if_added = max(longest, lengths[row])
        if current and longest_if_added * (len(current) + 1) > batch_tokens:
            groups.append(np.array(current))
            current, longest_if_added = [], lengths[row]
        current.append(row)
        longest = longest_if_added
    if current:
        groups.append(np.array(current))
    if rng is not None:
        rng.shuffle(groups)
    return groups


def reference_pad(sequences: list[list[int]]) -> torch.Tensor:
    out = torch.full((len(sequences), max(map(len, sequences))), PAD_ID, dtype=torch.long)
    for i, seq in enumerate(sequences):
        out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def reference_batch(src: list[list[int]], tgt: list[list[int]], rows: np.ndarray) -> dict[str, torch.Tensor]:
    """make_batch as it was on Python lists of ids."""
    return {"src": reference_pad([src[i] or [PAD_ID] for i in rows]),
            "src_len": torch.tensor([max(len(src[i]), 1) for i in rows]),
            "tgt_in": reference_pad([[SOS_ID] + tgt[i] for i in rows]),
            "tgt_out": reference_pad([tgt[i] + [EOS_ID] for i in rows])}


def random_ids(rng: np.random.Generator, n: int, longest: int, vocab: int) -> list[list[int]]:
    return [rng.integers(0, vocab, rng.integers(0, longest + 1)).tolist() for _ in range(n)]


def mapped(tmp_path, src: list[list[int]], tgt: list[list[int]]) -> ParallelData:
    for side, sequences in (("src", src), ("tgt", tgt)):
        half = len(sequences) // 2  # two chunks, as prepare's shards write them
        token_ids.write(tmp_path, "train", side, [token_ids.flatten(sequences[:half]),
                                                  token_ids.flatten(sequences[half:])])
    return ParallelData.open(tmp_path, "train")


@pytest.mark.parametrize("batch_tokens", [16, 37, 100, 2500])
def test_the_vectorised_plan_is_the_row_loops_on_every_seed(batch_tokens):
    rng = np.random.default_rng(batch_tokens)
    for trial in range(40):
        n = int(rng.integers(0, 400))
        longest = int(rng.choice([3, 30, 120, 3000]))  # 3000 > every budget: such rows go alone
        lengths = rng.integers(0, longest + 1, n)
        if trial % 5 == 0:
            lengths[rng.random(n) < 0.3] = 0  # many empty sentences
        data = ParallelData.from_frame(
            pd.DataFrame({"src_tokens": ["a"] * n, "tgt_tokens": [" ".join("w" * int(k)) for k in lengths]}),
            Vocab(["a"]), Vocab(["w"]))
        for seed in (None, trial, 1000 + trial):
            expected = reference_batches(lengths, batch_tokens, seed)
            plan = data.batches(batch_tokens, seed=seed)
            assert len(plan) == len(expected)
            # what schedule.planned_steps relies on: the jitter never changes an epoch's batch count
            assert len(expected) == len(reference_batches(lengths, batch_tokens, None))
            for got, want in zip(plan, expected):
                np.testing.assert_array_equal(got, want)


def test_group_starts_fill_each_batch_to_the_budget_of_its_longest_row():
    # lengths 2,2,2,3,3,10: budget 7 fits three 2s, then two 3s (3*2 <= 7), then the 10 alone
    np.testing.assert_array_equal(group_starts(np.array([2, 2, 2, 3, 3, 10]), 7), [0, 3, 5])
    # a group that started on short rows closes as soon as a longer row would overflow it
    np.testing.assert_array_equal(group_starts(np.array([1, 1, 1, 4, 4]), 8), [0, 3])  # 4 * 4 > 8, 4 * 2 <= 8
    assert len(group_starts(np.zeros(0, dtype=np.int64), 10)) == 0


def test_memory_mapped_batches_are_the_in_memory_batches(tmp_path):
    rng = np.random.default_rng(7)
    src, tgt = random_ids(rng, 300, 25, 50), random_ids(rng, 300, 25, 50)
    src[3], tgt[5], src[8], tgt[8] = [], [], [], []
    data = mapped(tmp_path, src, tgt)
    assert len(data) == 300
    np.testing.assert_array_equal(data.tgt_lengths, [len(t) for t in tgt])
    plan = data.epoch_batches(120, seed=3, epoch=1)
    for rows, want in zip(plan, reference_batches(np.array([len(t) for t in tgt]), 120, 4)):
        np.testing.assert_array_equal(rows, want)
        batch = data.make_batch(rows)
        np.testing.assert_array_equal(batch.index, rows)
        for name, tensor in reference_batch(src, tgt, rows).items():
            assert torch.equal(getattr(batch, name), tensor), name
        assert data.target_tokens(rows) == sum(len(tgt[i]) + 1 for i in rows)
        np.testing.assert_array_equal(data.target_words(rows), [w for i in rows for w in tgt[i]])


def test_a_subset_plan_holds_the_subsets_row_numbers(tmp_path):
    rng = np.random.default_rng(1)
    tgt = random_ids(rng, 50, 10, 9)
    data = mapped(tmp_path, tgt, tgt)
    rows = np.array([2, 7, 11, 30, 49])
    plan = data.batches(1000, rows=rows)
    order = np.argsort([len(tgt[i]) for i in rows], kind="stable")
    np.testing.assert_array_equal(np.concatenate(list(plan)), rows[order])


def test_opening_a_split_without_ids_files_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train\.src\.ids\.npy.*vamos prepare"):
        ParallelData.open(tmp_path, "train")


def test_prefetched_builds_every_item_in_order_and_stops_early():
    built = []

    def build(i):
        built.append(i)
        return i * i

    assert list(prefetched(range(5), build)) == [(i, i * i) for i in range(5)]
    built.clear()
    for i, _ in prefetched(range(100), build):
        if i == 2:
            break
    assert built == [0, 1, 2, 3]  # one ahead, no more


def test_right_to_left_batches_hold_each_target_backwards(tmp_path):
    """What a right-to-left model trains on: the same rows with each target reversed (its <eos>
    still last), sources and lengths untouched; empty targets included."""
    rng = np.random.default_rng(5)
    src, tgt = random_ids(rng, 120, 20, 40), random_ids(rng, 120, 20, 40)
    tgt[4] = []
    mapped(tmp_path, src, tgt)
    backward = ParallelData.open(tmp_path, "train", right_to_left=True)
    rows = np.array([4, 0, 7, 33, 119, 60])
    batch = backward.make_batch(rows)
    for name, tensor in reference_batch(src, [t[::-1] for t in tgt], rows).items():
        assert torch.equal(getattr(batch, name), tensor), name
    assert not torch.equal(batch.tgt_in, ParallelData.open(tmp_path, "train").make_batch(rows).tgt_in)
