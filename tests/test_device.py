import subprocess
import sys

import pytest
import torch
import yaml

from pipeline.config import ParamsError
from pipeline.device import pick_device
from tests.conftest import small_params


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_is_a_params_error():
    with pytest.raises(ParamsError, match="train.device is 'cuda' but this machine has no CUDA device"):
        pick_device("cuda")
    assert pick_device("auto") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_request_without_a_gpu_exits_2_with_one_line(tmp_path):
    """`vamos train` with train.device: cuda on a CPU machine: a clear message and exit 2, no traceback."""
    params = small_params()
    params["train"]["device"] = "cuda"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "train"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "train.device is 'cuda'" in done.stderr and "Traceback" not in done.stderr
