"""`python train.py tune_lr=true`: Lightning's learning-rate finder before training. The weights
are put back, the suggestion becomes head_lr with every other rate scaled alike (checkpoint,
hyperparameters and the optimizer's param groups), the plot is in the run folder, and the
settings it cannot work with are refused."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch
from lightning.pytorch.tuner.lr_finder import _LRCallback, _LRFinder
from omegaconf import OmegaConf
from PIL import Image

from helpers import build, check_run, run_cli, trainer
from transfer_learning.errors import ConfigError
from transfer_learning.run.lr_finder import (
    MIN_SWEEP,
    check_tune_lr,
    steepest_descent,
    tune_learning_rate,
    unbiased,
)

SUGGESTION = re.compile(r"LR finder: suggestion (\S+) \(was head_lr=(\S+)\); plot: (\S+)")


class _Trainer:
    """What Lightning's finder callback reads of the trainer after an optimizer step."""

    def __init__(self) -> None:
        self.global_step = 0
        self.accumulate_grad_batches = 1
        self.should_stop = False
        self.fit_loop = type("Loop", (), {"batch_idx": 0})()
        self.strategy = type("Strategy", (), {"broadcast": staticmethod(lambda x: x)})()


def test_unbiased_undoes_lightnings_off_by_one_bias_correction():
    """Fed Lightning's own finder callback, as its loop calls it (the global step already counts
    the step just taken), `unbiased` gives the textbook bias-corrected moving average: a constant
    loss reads constant from the first point, where Lightning's record reads about half of it."""
    raw = [1.6] * 5 + [1.6 - 0.01 * i for i in range(40)]
    callback = _LRCallback(num_training=len(raw), early_stop_threshold=None)
    fake = _Trainer()
    for i, loss in enumerate(raw):
        fake.global_step = i + 1
        callback.on_train_batch_end(fake, None, {"loss": torch.tensor(loss)}, None, i)
    assert callback.losses[0] == pytest.approx(0.505 * 1.6, rel=0.01)  # Lightning 2.6's reading
    fixed = unbiased(callback.losses)
    average, expected = 0.0, []
    for i, loss in enumerate(raw):
        average = 0.98 * average + 0.02 * loss
        expected.append(average / (1 - 0.98 ** (i + 1)))
    assert fixed == pytest.approx(expected, rel=1e-6)
    assert fixed[:5] == pytest.approx([1.6] * 5, rel=1e-6)


def test_the_suggestion_is_the_steepest_descent_against_log_lr():
    lrs = [1e-6 * 10 ** (6 * i / 59) for i in range(60)]
    # Flat, a slight dip at the smallest rates (where d loss / d lr is largest: Lightning 2.6's
    # pick), the real descent centred on 1e-2, ...
    losses = [1.6 - 0.8 / (1 + math.exp(-3 * (math.log10(lr) + 2))) for lr in lrs]
    losses[8] -= 0.002
    # then divergence, whose noise falls steeply in places (5 -> 1.5): not a descent to use.
    losses[-7:] = [2.0, 4.0, 5.0, 1.5, 9.0, 6.0, float("nan")]
    index, why = steepest_descent(lrs, losses, skip_begin=6)
    assert index is not None and why == ""
    assert lrs[index] == pytest.approx(1e-2, rel=0.3)
    lightning = _LRFinder("exponential", lrs[0], lrs[-1], len(lrs))
    lightning.results = {"lr": lrs, "loss": losses}
    assert lightning.suggestion(skip_begin=6) < 1e-4, (
        "Lightning's suggestion() was fixed: steepest_descent may go"
    )

    rising = [1.0 + 0.01 * i for i in range(60)]
    assert steepest_descent(lrs, rising, 6) == (
        None,
        "the loss did not fall in the sweep (lowest at its start, lr 4.1e-06)",
    )
    index, why = steepest_descent(lrs[:4], losses[:4], 1)
    assert index is None and "too few" in why


def test_settings_the_finder_cannot_work_with_are_refused(tmp_path):
    ok = OmegaConf.create({"tune_lr": True, "ckpt_path": None, "tune_lr_steps": 100})
    check_tune_lr(ok)
    check_tune_lr(OmegaConf.create({"tune_lr": False, "ckpt_path": "last", "tune_lr_steps": 1}))
    with pytest.raises(ConfigError, match=r"tune_lr=true with ckpt_path=last: a resumed run keeps"):
        check_tune_lr(OmegaConf.merge(ok, {"ckpt_path": "last"}))
    for steps in (3, 2.5, "many"):
        with pytest.raises(ConfigError, match=rf"tune_lr_steps={steps}: .* 10 or more"):
            check_tune_lr(OmegaConf.merge(ok, {"tune_lr_steps": steps}))


@pytest.mark.slow
def test_the_finder_puts_the_weights_back_and_sets_every_rate(shapes_dir, tmp_path, capsys):
    """Fine-tuning: the sweep trains backbone and head, and both come back bit for bit (BatchNorm
    statistics too). The new rates reach the strategy, the hyperparameters (checkpointed and
    logged) and, through configure_optimizers, the optimizer of the fit that follows. The run
    trains a few steps: the sweep is cut from 100 to MIN_SWEEP."""
    module, datamodule = build(shapes_dir, "strategy=finetune", image_size=48)
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    fit = trainer(max_epochs=1, default_root_dir=tmp_path)
    summary = tune_learning_rate(fit, module, datamodule, tmp_path, [], steps=100)
    runs = len(datamodule.train_dataloader())
    assert f"over at most {MIN_SWEEP} steps (the run trains {runs});" in capsys.readouterr().out

    after = module.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k].cpu()) for k in before), "the sweep changed the weights"
    assert not list(tmp_path.glob(".lr_find*.ckpt"))  # Lightning's temporary checkpoint is gone

    head, backbone = module.strategy.head_lr, module.strategy.backbone_lr
    assert summary["lr finder"] == f"head_lr 1.0e-03 -> {head:.1e}, backbone_lr 1.0e-04 -> {backbone:.1e}"
    assert head == float(f"{head:.1e}") and backbone / head == pytest.approx(0.1)
    for hparams in (module.hparams, module.hparams_initial):
        assert hparams["strategy"]["head_lr"] == head and hparams["strategy"]["backbone_lr"] == backbone
    plot = tmp_path / "lr_finder.png"
    assert summary["lr finder plot"] == str(plot) and plot.is_file()
    assert fit.fit_loop.max_epochs == 1 and fit.check_val_every_n_epoch == 1  # put back

    fit.fit(module, datamodule)
    groups = {g["name"]: g["initial_lr"] for g in fit.optimizers[0].param_groups}
    assert groups == {"backbone": backbone, "head": head}


def test_without_a_suggestion_the_configured_rates_stay(shapes_dir, tmp_path):
    module, datamodule = build(shapes_dir, image_size=48)
    summary = tune_learning_rate(trainer(fast_dev_run=True), module, datamodule, tmp_path, [], steps=20)
    assert summary == {
        "lr finder": "no suggestion (Lightning skips the finder with trainer.fast_dev_run); "
        "kept head_lr=1.0e-01"
    }
    assert module.strategy.head_lr == 0.1 and module.hparams["strategy"]["head_lr"] == 0.1


def _suggestion(stdout: str) -> tuple[float, float, str]:
    match = SUGGESTION.search(stdout)
    assert match, stdout[-3000:]
    return float(match[1]), float(match[2]), match[3]


def _check_plot(path: str) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width >= 800 and height >= 500


def _metrics(summary: dict) -> list[dict[str, str]]:
    with open(summary["CSV metrics"]) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_tune_lr_on_the_command_line_fine_tuning(tmp_path, shapes_dir):
    result = run_cli(
        tmp_path, f"data.root={shapes_dir}", "input.image_size=48", "tune_lr=true", "tune_lr_steps=20",
        "trainer.max_epochs=1", "trainer.log_every_n_steps=1", "logger=csv", "strategy=finetune",
        "scheduler=constant",
    )  # fmt: skip
    summary = check_run(tmp_path, result, "finetune")
    suggestion, was, plot = _suggestion(result.stdout)
    assert was == 1e-3
    assert plot == str(tmp_path / "run" / "lr_finder.png") == summary["lr finder plot"]
    _check_plot(plot)
    assert (
        summary["lr finder"]
        == f"head_lr 1.0e-03 -> {suggestion:.1e}, backbone_lr 1.0e-04 -> {suggestion / 10:.1e}"
    )
    assert "over at most 20 steps;" in result.stdout  # tune_lr_steps (under MIN_SWEEP: not capped)

    checkpoint = torch.load(summary["best checkpoint"], map_location="cpu", weights_only=True)
    rates = checkpoint["hyper_parameters"]["strategy"]
    assert rates["head_lr"] == suggestion
    assert rates["backbone_lr"] / rates["head_lr"] == pytest.approx(1e-4 / 1e-3)

    # The learning rate monitor's record of the training that followed: the suggested rates, throughout.
    rows = [r for r in _metrics(summary) if r.get("lr-AdamW/head")]
    assert rows
    for row in rows:
        assert float(row["lr-AdamW/head"]) == pytest.approx(suggestion, rel=1e-9)
        assert float(row["lr-AdamW/backbone"]) == pytest.approx(rates["backbone_lr"], rel=1e-9)


@pytest.mark.slow
def test_tune_lr_on_the_command_line_feature_extraction(tmp_path, shapes_dir):
    """The default strategy: features cached once (the sweep trains the head on them), the head's
    rate the only one."""
    result = run_cli(
        tmp_path, f"data.root={shapes_dir}", "input.image_size=48", "tune_lr=true", "tune_lr_steps=20",
        "trainer.max_epochs=1", "trainer.log_every_n_steps=1", "logger=csv",
    )  # fmt: skip
    summary = check_run(tmp_path, result, "feature_extract")
    suggestion, was, plot = _suggestion(result.stdout)
    assert was == 0.1
    _check_plot(plot)
    assert summary["lr finder"] == f"head_lr 1.0e-01 -> {suggestion:.1e}"
    assert summary["feature cache"].startswith("3 built, 0 reused")
    checkpoint = torch.load(summary["best checkpoint"], map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["strategy"]["head_lr"] == suggestion
    # warmup_cosine: one factor (at most 1) on the suggested rate
    head = [float(r["lr-AdamW/head"]) for r in _metrics(summary) if r.get("lr-AdamW/head")]
    assert head and max(head) <= suggestion * (1 + 1e-9)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["lr finder"] == summary["lr finder"]


@pytest.mark.slow
def test_tune_lr_with_ckpt_path_is_refused_without_a_traceback(tmp_path, shapes_dir):
    (tmp_path / "last.ckpt").write_bytes(b"")  # it exists: tune_lr is refused before the file is read
    result = run_cli(
        tmp_path, f"data.root={shapes_dir}", "logger=csv", "tune_lr=true", f"ckpt_path={tmp_path}/last.ckpt"
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    assert (
        f"tune_lr=true with ckpt_path={tmp_path}/last.ckpt: a resumed run keeps the learning rates" in output
    )
    assert "Traceback" not in output


def test_the_finder_scales_the_rates_a_strategy_names_in_lr_names_only():
    from transfer_learning.model.strategies import FeatureExtraction, FineTuning
    from transfer_learning.run.lr_finder import _rates

    class WithWarmup(FineTuning):
        lr_names = ("backbone_lr", "head_lr", "neck_lr")

        def __init__(self) -> None:
            super().__init__(head_lr=1e-3, backbone_lr=1e-4)
            self.neck_lr = 5e-4
            self.warmup_lr = 1e-6  # named like a rate, but not one the strategy lists

    assert _rates(WithWarmup()) == {"head_lr": 1e-3, "backbone_lr": 1e-4, "neck_lr": 5e-4}
    # feature_extract accepts backbone_lr (one search space for both) but does not list it.
    assert _rates(FeatureExtraction(head_lr=0.1)) == {"head_lr": 0.1}

    class Broken(FineTuning):
        lr_names = ("head_lr", "schedule_lr")
        schedule_lr = "cosine"

    with pytest.raises(ConfigError, match="lists 'schedule_lr' in lr_names, but its value is 'cosine'"):
        _rates(Broken())
