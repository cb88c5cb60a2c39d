"""Where the model runs and in what precision: the device, bf16 where the hardware has it, the
default generator of a device, memory use, and a description of the host for reports.

Used by train, evaluate, registry and serving, so none of them imports the training code."""
from __future__ import annotations

import os
import platform
import resource
from functools import lru_cache

import torch

from pipeline.config import PARAMS_FILE, ParamsError


def pick_device(choice: str) -> torch.device:
    """`auto` is CUDA when there is a GPU, else the CPU; asking for CUDA without one is a params error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ParamsError(f"{PARAMS_FILE}: train.device is 'cuda' but this machine has no CUDA device "
                          "(torch.cuda.is_available() is False): use 'auto' or 'cpu'")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def has_bf16(device: torch.device) -> bool:
    """Native bf16 matrix instructions (oneDNN would emulate bf16 on any AVX512 CPU, slowly)."""
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return device.type == "cuda"


def uses_bf16(amp: bool, device: torch.device) -> bool:
    return amp and has_bf16(device)


def autocast(amp: bool, device: torch.device):
    """bf16 mixed precision (no loss scaling needed) where the hardware has bf16: CUDA, and CPUs
    with AVX512-BF16 or AMX, where it trains 1.3x (hidden 256) to 1.6x (hidden 512, 2 layers) as
    fast as fp32. Elsewhere fp32: emulated bf16 would be slower."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(amp, device))


def precision_name(amp: bool, device: torch.device) -> str:
    """What training computes in on this machine: `amp` alone does not say (no bf16, no autocast)."""
    return "bf16 mixed" if uses_bf16(amp, device) else "fp32"


def default_generator(device: torch.device) -> torch.Generator:
    """`device`'s default random generator, where dropout and sampling draw."""
    if device.type != "cuda":
        return torch.default_generator
    torch.cuda.init()  # default_generators is empty until CUDA initialises
    return torch.cuda.default_generators[torch.cuda.current_device() if device.index is None else device.index]


def peak_memory_mb(device: torch.device) -> float:
    """The GPU's peak allocation on CUDA, else this process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# The CPU flags that change which kernels torch and BLAS run, so what a training computes.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "asimd", "sve")


@lru_cache(maxsize=1)
def cpu_info() -> tuple[str, tuple[str, ...]]:
    """The CPU's model name as /proc/cpuinfo gives it, and which of ISA_FLAGS it has."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())  # the first processor's
    except OSError:
        pass
    name = fields.get("model name") or fields.get("Model") or platform.processor() or platform.machine()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return name, tuple(f for f in ISA_FLAGS if f in flags)


def host(device: torch.device) -> dict:
    """What a result depends on beyond the commit and params: the same CPU model (and GPU) gives
    bit-identical training; another one agrees only within the test set's noise (BLAS and oneDNN
    kernels change the last bits). Small and stable, for reports/train.json."""
    cpu, isa = cpu_info()
    return {"cpu": cpu, "isa": list(isa),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def software() -> dict:
    """Library versions, the allocator and the BLAS kernels in use, for the MLflow run (not the DVC lock)."""
    import numpy

    from pipeline import allocator

    return {"torch": torch.__version__, "numpy": numpy.__version__, "python": platform.python_version(),
            "allocator": allocator.in_use(), "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", "auto"),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
