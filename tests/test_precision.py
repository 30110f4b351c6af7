"""`trainer.precision=auto` (every trainer config's default): bf16-mixed where the processor runs
bf16 natively, 16-mixed on GPUs without it, 32 elsewhere, said in the run summary; an explicit
bf16 on hardware that emulates it runs, with one warning giving the cost measured here.

CPUs other than this machine's are stood in for by their /proc/cpuinfo flags line."""

from __future__ import annotations

import logging
import re

import pytest
import torch
import yaml

from helpers import check_run, run_cli
from transfer_learning import hardware
from transfer_learning.hardware import bf16_slowdown, choose_precision
from transfer_learning.run.config import compose_config

EMULATING = "flags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw avx512_vnni"  # AVX-512, but no BF16
NATIVE = EMULATING + " avx512_bf16"
AMX = "flags\t\t: fpu sse sse2 avx avx2 amx_bf16 amx_tile"

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="accelerator=auto would pick the GPU")


@pytest.fixture
def cpu_flags(monkeypatch: pytest.MonkeyPatch):
    def use(flags: str) -> None:
        monkeypatch.setattr(hardware, "_cpu_flags", lambda: flags)

    return use


@no_gpu
@pytest.mark.parametrize(
    ("flags", "expected"), [(NATIVE, "bf16-mixed"), (AMX, "bf16-mixed"), (EMULATING, "32-true")]
)
def test_auto_on_a_cpu_follows_its_bf16_instructions(cpu_flags, flags, expected):
    cpu_flags(flags)
    for accelerator in ("auto", "cpu"):
        choice = choose_precision("auto", accelerator)
        assert choice.precision == expected and choice.warning is None
        assert choice.reason.startswith("auto: CPU ") and hardware.cpu_name() in choice.reason
        assert ("emulates bf16" in choice.reason) == (expected == "32-true")


@no_gpu
def test_auto_on_a_bf16_cpu_keeps_float32_where_bf16_does_not_pay(cpu_flags):
    """Measured: bf16 fine-tuning beats float32 on such a CPU at 224 px, not at 64-160 px, and
    never for a head alone (frozen or cached backbone)."""
    cpu_flags(NATIVE)
    assert choose_precision("auto", "cpu", crop_size=224).precision == "bf16-mixed"
    assert choose_precision("auto", "cpu", crop_size=hardware.CPU_BF16_MIN_SIZE).precision == "bf16-mixed"
    small = choose_precision("auto", "cpu", crop_size=128)
    assert small.precision == "32-true" and small.reason.startswith("auto: 128 px crops")
    frozen = choose_precision("auto", "cpu", crop_size=224, trains_backbone=False)
    assert frozen.precision == "32-true" and "frozen backbone" in frozen.reason


@no_gpu
@pytest.mark.parametrize("requested", ["bf16-mixed", "bf16-true", "16-mixed"])
def test_an_explicit_bf16_on_an_emulating_cpu_is_kept_with_its_measured_cost(cpu_flags, requested):
    cpu_flags(EMULATING)
    choice = choose_precision(requested, "cpu")
    assert choice.precision == requested and "emulated" in choice.reason
    assert choice.warning and f"trainer.precision={requested}" in choice.warning
    assert re.search(r"takes \d+\.\dx the time of a float32 one", choice.warning)
    assert "trainer.precision=auto" in choice.warning
    cpu_flags(NATIVE)  # the same choice where bf16 is native: no warning
    assert choose_precision(requested, "cpu").warning is None


def test_explicit_choices_are_kept_as_set(cpu_flags):
    cpu_flags(EMULATING)
    for requested in ("32", "32-true", "64-true"):
        choice = choose_precision(requested, "cpu")
        assert (choice.precision, choice.reason, choice.warning) == (requested, "as set", None)


def test_the_measured_cost_is_a_ratio_of_two_real_timings():
    ratio = bf16_slowdown(torch.device("cpu"), repeats=2)
    assert 0.01 < ratio < 1000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_auto_on_a_gpu_follows_its_compute_capability():
    expected = "bf16-mixed" if torch.cuda.get_device_capability(0) >= (8, 0) else "16-mixed"
    assert choose_precision("auto", "gpu").precision == expected


def test_every_trainer_config_defaults_to_auto():
    for trainer in ("default", "cpu", "gpu", "ddp", "ddp_cpu", "multinode"):
        assert compose_config([f"trainer={trainer}"]).trainer.precision == "auto", trainer


@no_gpu
def test_a_run_trains_at_the_chosen_precision_and_says_why(shapes_dir, tmp_path):
    """The command line, as typed: the summary names the precision auto chose on this machine
    and why, and the checkpoint's Trainer state was written at that precision."""
    result = run_cli(tmp_path, f"data.root={shapes_dir}", "input.image_size=48", "trainer.max_epochs=1",
                     "logger=csv", "worst_samples=0", "strategy=finetune")  # fmt: skip
    summary = check_run(tmp_path, result, "finetune")
    expected = "32-true"  # 48 px crops: bf16 does not pay on any CPU
    why = "auto: 48 px crops" if hardware.cpu_has_bf16() else f"auto: CPU {hardware.cpu_name()} emulates"
    assert summary["precision"].startswith(f"{expected} ({why}")
    assert "Warning: trainer.precision" not in result.stdout + result.stderr
    assert "Automatic Mixed Precision" not in result.stdout + result.stderr  # the summary says it once
    logged = yaml.safe_load((tmp_path / "run" / "csv" / "hparams.yaml").read_text())
    assert logged["trainer"]["precision"] == expected  # the config the Trainer was built from


@no_gpu
def test_an_explicit_bf16_run_on_an_emulating_cpu_warns_once(cpu_flags, caplog, shapes_dir, tmp_path):
    from transfer_learning.pipelines.train import resolve_precision

    cpu_flags(EMULATING)
    cfg = compose_config(["trainer=cpu", "trainer.precision=bf16-mixed"])
    with caplog.at_level(logging.WARNING, logger="transfer_learning.pipelines.train"):
        choice = resolve_precision(cfg)
    assert cfg.trainer.precision == "bf16-mixed" == choice.precision
    warnings = [r.getMessage() for r in caplog.records if "trainer.precision" in r.getMessage()]
    assert len(warnings) == 1 and "emulates it" in warnings[0]
    cfg = compose_config(["trainer=cpu"])
    assert resolve_precision(cfg).precision == cfg.trainer.precision == "32-true"
    cpu_flags(NATIVE)  # the run's network decides: a frozen backbone keeps float32
    from transfer_learning.run.config import build

    for strategy, expected in (("feature_extract", "32-true"), ("finetune", "bf16-mixed")):
        cfg = compose_config(["trainer=cpu", f"strategy={strategy}", f"data.root={shapes_dir}",
                              "input.image_size=224", "data.num_workers=0",
                              f"paths.root_dir={tmp_path}"])  # fmt: skip
        _, module = build(cfg)
        assert resolve_precision(cfg, module).precision == expected, strategy


def test_mixed_precision_trains_but_validation_and_test_measure_the_float32_model(shapes_dir, tmp_path):
    """bf16-mixed speeds up the training steps only: the run's test numbers are the float32
    model's (what eval, predict and export use), equal to a float32 test of its checkpoint."""
    from helpers import trainer
    from transfer_learning.pipelines.train import train
    from transfer_learning.run.config import build

    overrides = [f"data.root={shapes_dir}", "input.image_size=32", "data.num_workers=0", "strategy=finetune",
                 "trainer=cpu", "trainer.max_epochs=1", "logger=csv", "worst_samples=0",
                 "calibrate=false", f"paths.root_dir={tmp_path}"]  # fmt: skip
    cfg = compose_config([*overrides, "trainer.precision=bf16-mixed"], output_dir=tmp_path / "run")
    metrics = train(cfg)
    assert metrics["summary"]["precision"].startswith("bf16-mixed")

    datamodule, module = build(compose_config(overrides, output_dir=tmp_path / "check"))
    (float32,) = trainer(precision="32-true").test(
        module, datamodule, ckpt_path=metrics["best_checkpoint"], verbose=False
    )
    (bf16,) = trainer(precision="bf16-mixed").test(
        module, datamodule, ckpt_path=metrics["best_checkpoint"], verbose=False
    )
    for key in ("test/loss", "test/acc", "test/f1"):
        assert metrics[key] == pytest.approx(float32[key], abs=1e-6), key
        assert bf16[key] == pytest.approx(float32[key], abs=1e-6), key  # the same under either setting


@pytest.mark.parametrize("typo", ["abc", "bf16_mixed", "fp16"])
def test_an_unknown_precision_is_stopped_before_anything_is_built(typo):
    from transfer_learning.errors import ConfigError
    from transfer_learning.pipelines.train import resolve_precision

    cfg = compose_config([f"trainer.precision={typo}"])
    with pytest.raises(ConfigError, match=rf"trainer.precision={typo} is not a precision\. Use auto"):
        resolve_precision(cfg)
