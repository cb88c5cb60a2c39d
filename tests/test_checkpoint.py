import os
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import CODE, fingerprint, training_inputs
from pipeline.config import Params

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


def test_fingerprint_covers_computation_not_speed(tmp_path):
    params = Params()
    base = fingerprint(params, [], "fp32", CPU)
    for speed_or_stop in ({"threads": 3}, {"checkpoint_every": 7}, {"epochs": 30}, {"max_minutes": 5.0},
                          {"patience": 9}, {"max_steps": 100}, {"lexicon_pairs": 10}):
        changed = params.model_copy(update={"train": params.train.model_copy(update=speed_or_stop)})
        assert fingerprint(changed, [], "fp32", CPU) == base
    for computation in ({"input_feeding": not params.train.input_feeding}, {"sampled_softmax": 10},
                        {"word_dropout": 0.3}, {"validate_every": 100}):
        changed = params.model_copy(update={"train": params.train.model_copy(update=computation)})
        assert fingerprint(changed, [], "fp32", CPU) != base
    assert fingerprint(params, [], "bf16 mixed", CPU) != base  # the same params on a machine with bf16
    cosine = params.model_copy(update={"train": params.train.model_copy(update={"lr_schedule": "cosine"})})
    longer = params.model_copy(update={"train": cosine.train.model_copy(update={"epochs": 30})})
    # the decay is stretched to the planned length
    assert fingerprint(cosine, [], "fp32", CPU) != fingerprint(longer, [], "fp32", CPU)
    code = Path(__file__).resolve().parent.parent / "pipeline"
    covered = {p.relative_to(code).as_posix() for pattern in CODE for p in code.glob(pattern)}
    assert {"train.py", "loss.py", "schedule.py", "checkpoint.py", "validation.py", "device.py", "embeddings.py",
            "text.py", "data.py", "decode.py", "model/decoder.py"} <= covered
    data_file = tmp_path / "train.parquet"
    data_file.write_bytes(b"a")
    before = fingerprint(params, [data_file], "fp32", CPU)
    data_file.write_bytes(b"b")
    assert fingerprint(params, [data_file], "fp32", CPU) != before


def test_fingerprint_follows_the_device_that_runs_not_the_setting():
    """`device: auto` trains on a GPU on one machine and on the CPU on another: a checkpoint copied
    between them must not resume (it would drop the CUDA random state without a word)."""
    params = Params()
    on_auto = params.model_copy(update={"train": params.train.model_copy(update={"device": "auto"})})
    on_cuda = params.model_copy(update={"train": params.train.model_copy(update={"device": "cuda"})})
    assert fingerprint(on_auto, [], "bf16 mixed", GPU) != fingerprint(on_auto, [], "bf16 mixed", CPU)
    assert fingerprint(on_auto, [], "bf16 mixed", GPU) == fingerprint(on_cuda, [], "bf16 mixed", GPU)


def test_the_fingerprint_hashes_the_manifest_not_the_corpus(tmp_path):
    prepared, embeddings = tmp_path / "prepared", tmp_path / "embeddings"
    prepared.mkdir(), embeddings.mkdir()
    with pytest.raises(FileNotFoundError, match=r"manifest\.json is missing"):
        training_inputs(prepared, embeddings)
    for name in ("vocab.src.json", "vocab.tgt.json", "train.parquet", "train.tgt.ids.npy"):
        (prepared / name).write_text(name)
    (embeddings / "src.w2v").write_text("vectors")
    manifest = prepared / "manifest.json"
    manifest.write_text('{"files": {"train.parquet": "aaa"}}')
    inputs = training_inputs(prepared, embeddings)
    assert prepared / "train.parquet" not in inputs and embeddings / "src.w2v" in inputs
    params = Params()
    before = fingerprint(params, inputs, "fp32", CPU)
    os.utime(prepared / "train.parquet", (0, 12345))  # a checkout or a copy: a new mtime, same data
    (prepared / "train.tgt.ids.npy").write_text("never read")
    assert fingerprint(params, training_inputs(prepared, embeddings), "fp32", CPU) == before
    manifest.write_text('{"files": {"train.parquet": "bbb"}}')  # prepare wrote other data
    assert fingerprint(params, training_inputs(prepared, embeddings), "fp32", CPU) != before
    (embeddings / "src.w2v").write_text("other vectors")
    assert fingerprint(params, training_inputs(prepared, embeddings), "fp32", CPU) != before
