"""What this machine's processors run natively, and the precision that suits them.

``trainer.precision=auto`` (every trainer config's default) becomes, through
:func:`choose_precision`:

- ``bf16-mixed`` on a GPU with native bfloat16 (Ampere and newer), and on a CPU with bfloat16
  matrix instructions (AVX-512 BF16 or AMX) when the backbone trains on crops of at least
  :data:`CPU_BF16_MIN_SIZE` px: there the convolutions are big enough for bf16 to pay (measured
  on a 2-core EPYC with AVX-512 BF16, two fine-tuning epochs as whole processes: 12% faster than
  float32 at 224 px, equal at 160, up to 17% slower at 64-128; a frozen or cached backbone leaves
  only the head's small matmuls, where the casts cost more than they save);
- ``16-mixed`` on an older GPU (T4, V100: float16 tensor cores, no native bfloat16);
- ``32-true`` elsewhere: a CPU without those instructions emulates bfloat16, many times slower.

An explicit bf16 choice on hardware that emulates it still runs, after one warning with the cost
measured on this machine (:func:`bf16_slowdown`). Nothing here imports Lightning.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

AUTO = "auto"
BF16 = ("bf16-mixed", "bf16-true", "bf16")
CPU_BF16_MIN_SIZE = 192
# What Lightning's Trainer(precision=...) takes, and auto: the usual choices, then the others.
USUAL_PRECISIONS = (AUTO, "32", "16-mixed", "bf16-mixed")
OTHER_PRECISIONS = ("32-true", "16", "16-true", "bf16", "bf16-true", "64", "64-true", "transformer-engine",
                    "transformer-engine-float16")  # fmt: skip
PRECISIONS = USUAL_PRECISIONS + OTHER_PRECISIONS


@functools.cache
def _cpuinfo_line(key: str) -> str | None:
    """The value of ``key`` in /proc/cpuinfo's first processor (None where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":")[0].strip() == key), None)


def _cpu_flags() -> str:
    return _cpuinfo_line("flags") or ""


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    return _cpuinfo_line("model name") or platform.processor() or platform.machine()


def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX: bfloat16 matrix instructions that make bf16 autocast pay on a CPU."""
    flags = _cpu_flags().split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_description() -> str:
    """One line for benchmarks and summaries: the CPU, its cores and its bfloat16 support."""
    native = "native bf16 (AVX-512 BF16/AMX)" if cpu_has_bf16() else "no native bf16 (emulated)"
    return f"{cpu_name()}, {os.cpu_count()} cores, {native}"


def gpu_has_bf16(index: int = 0) -> bool:
    """bfloat16 in the GPU's own arithmetic (compute capability 8.0 and newer), not emulated."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability(index) >= (8, 0)


def _gpu(index: int = 0) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor})"


def uses_gpu(accelerator: str) -> bool:
    """Whether Lightning's ``accelerator`` setting lands on a CUDA GPU on this machine."""
    return accelerator in ("gpu", "cuda") or (accelerator == AUTO and torch.cuda.is_available())


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # what the Trainer gets
    reason: str  # why, in words, for the run summary
    warning: str | None = None  # an explicit choice this hardware runs slowly


def choose_precision(
    requested: str | int, accelerator: str = AUTO, crop_size: int | None = None, trains_backbone: bool = True
) -> PrecisionChoice:
    """``requested`` (``trainer.precision``) for ``accelerator`` (``trainer.accelerator``):
    ``auto`` resolved for this machine and, on a CPU, for what trains (``trains_backbone``, at
    ``crop_size`` px); any other value kept, with a warning when it is bf16 on hardware that
    emulates it."""
    requested = str(requested)
    gpu = uses_gpu(accelerator)
    if requested == AUTO:
        if gpu:
            if gpu_has_bf16():
                return PrecisionChoice("bf16-mixed", f"auto: {_gpu(0)} runs bf16 natively")
            return PrecisionChoice("16-mixed", f"auto: {_gpu(0)} has no native bf16: float16, loss scaled")
        if accelerator not in (AUTO, "cpu"):
            return PrecisionChoice("32-true", f"auto: float32 on accelerator={accelerator}")
        if not cpu_has_bf16():
            return PrecisionChoice("32-true", f"auto: CPU {cpu_name()} emulates bf16 (no AVX-512 BF16/AMX)")
        if not trains_backbone:
            return PrecisionChoice("32-true", "auto: frozen backbone, bf16 does not pay for a head on a CPU")
        if crop_size is not None and crop_size < CPU_BF16_MIN_SIZE:
            return PrecisionChoice(
                "32-true", f"auto: {crop_size} px crops; bf16 pays on a CPU from {CPU_BF16_MIN_SIZE} px"
            )
        return PrecisionChoice("bf16-mixed", f"auto: CPU {cpu_name()} has AVX-512 BF16/AMX instructions")
    # On a CPU, Lightning runs 16-mixed as bf16-mixed (float16 autocast is GPU-only).
    runs_bf16 = requested in BF16 or (not gpu and requested in ("16-mixed", "16"))
    native = gpu_has_bf16() if gpu else cpu_has_bf16()
    if runs_bf16 and accelerator in (AUTO, "cpu", "gpu", "cuda") and not native:
        device = _gpu(0) if gpu else f"CPU {cpu_name()}"
        ratio = bf16_slowdown(torch.device("cuda" if gpu else "cpu"))
        return PrecisionChoice(
            requested,
            "as set, bf16 emulated by this hardware",
            f"trainer.precision={requested}: {device} has no native bf16 and emulates it; measured "
            f"here, a bf16 convolution takes {ratio:.1f}x the time of a float32 one. "
            "trainer.precision=auto picks the fastest precision this hardware runs natively.",
        )
    return PrecisionChoice(requested, "as set")


def bf16_slowdown(device: torch.device, repeats: int = 3) -> float:
    """How many times slower one convolution (a 3x3 layer of a small network's middle stage)
    runs under bf16 autocast than in float32 on ``device``: fastest of ``repeats`` each."""
    x = torch.randn(8, 64, 28, 28, device=device).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(device).to(memory_format=torch.channels_last)

    def fastest(bf16: bool) -> float:
        best = float("inf")
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            for _ in range(repeats + 1):  # the first call warms up
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                conv(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
        return best

    return fastest(True) / fastest(False)
