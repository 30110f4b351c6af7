"""Temperature scaling: the fit, the three numbers, the multi-label thresholds that move with it,
and a real run whose checkpoint, summary, report, eval, predict and export all agree on it."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import REPO, best_checkpoint, run_cli
from transfer_learning.model.calibration import (
    ECE_BINS,
    PRIOR_SD,
    calibration_metrics,
    choose_temperature,
    fit_temperature,
    reliability_bins,
)
from transfer_learning.model.tasks import MultilabelMetrics


def calibrated_sample(n: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels drawn from those logits' own softmax: perfectly calibrated data."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g) * 2.5
    labels = torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 3.0])
def test_the_fit_finds_the_temperature_that_was_applied(true_temperature):
    logits, labels = calibrated_sample(6000, 5)
    # A network reporting logits * T' is miscalibrated by T'; the fit must divide it back out.
    fitted = fit_temperature(logits * true_temperature, labels, multilabel=False)
    assert fitted == pytest.approx(true_temperature, rel=0.08)
    before = calibration_metrics((logits * true_temperature).softmax(-1), labels, False)
    after = calibration_metrics((logits * true_temperature / fitted).softmax(-1), labels, False)
    assert after["nll"] <= before["nll"] + 1e-12
    if true_temperature != 1.0:
        assert after["ece"] < before["ece"] and after["ece"] < 0.03


def test_multilabel_fit_uses_one_shared_temperature_on_the_sigmoids():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3000, 4, generator=g) * 2
    targets = torch.bernoulli(logits.sigmoid(), generator=g)
    assert fit_temperature(logits * 2.0, targets, multilabel=True) == pytest.approx(2.0, rel=0.1)


def test_temperature_stays_1_where_the_images_cannot_identify_one():
    assert fit_temperature(torch.empty(0, 3), torch.empty(0, dtype=torch.long), False) == 1.0
    logits = torch.eye(3).repeat(20, 1) * 4  # 60 images, every one right: the likelihood wants T -> 0
    kept = choose_temperature(logits, torch.arange(3).repeat(20), False)
    assert (kept.temperature, kept.fitted) == (1.0, False) and "all 60 images right" in kept.why
    few = choose_temperature(torch.randn(6, 3), torch.arange(3).repeat(2), False)
    assert (few.temperature, few.fitted) == (1.0, False) and "only 6 images" in few.why
    z = torch.eye(3).repeat(10, 1) * 3
    y = torch.arange(3).repeat(10)
    y[0] = 1  # one mistake in 30: a fitted T gains too little over T = 1 to be told from chance
    chance = choose_temperature(z, y, False)
    assert (chance.temperature, chance.fitted) == (1.0, False) and "likelihood-ratio test" in chance.why
    targets = torch.eye(3).repeat(20, 1)  # multi-label: every (image, class) call right
    every = choose_temperature((targets * 2 - 1) * 3, targets, True)
    assert every.why.startswith("all 180 class calls right")


def test_the_prior_holds_a_few_images_near_1_and_lets_many_decide():
    # Over-confident by 3x: many images find T = 3; 24 images with 4 confident mistakes move T only
    # part way, and the fit equals the minimum of the penalised NLL computed on a grid.
    logits, labels = calibrated_sample(4000, 5, seed=4)
    many = choose_temperature(logits * 3, labels, False)
    assert many.fitted and many.temperature == pytest.approx(3.0, rel=0.08)
    z = torch.tensor([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0]]).repeat(8, 1)
    y = torch.arange(3).repeat(8)
    y[:4] = torch.tensor([1, 2, 0, 2])  # four confident mistakes
    few = choose_temperature(z, y, False)
    grid = torch.linspace(-2, 3, 5001, dtype=torch.float64)
    prior = grid**2 / (2 * PRIOR_SD**2)
    data = torch.stack([F.cross_entropy(z.double() / t.exp(), y) * 24 for t in grid])
    penalised = (data + prior).numpy()
    best = float(grid[int(np.argmin(penalised))])
    assert few.fitted and math.log(few.temperature) == pytest.approx(best, abs=2e-3)
    unpenalised = [float(F.cross_entropy(z.double() / t.exp(), y)) for t in grid]
    assert "4 of 24 predictions wrong" in few.why
    assert 1.0 < few.temperature < math.exp(float(grid[int(np.argmin(unpenalised))]))


def test_a_sharpening_that_one_more_wrong_image_would_undo_is_not_made():
    """240 images, right at ~0.99 and one wrong, a hard one (a close call): the likelihood
    sharpens (T < 1) for a tiny gain that the next confident mistake would cost many times over:
    T = 1 kept. Right at ~0.6
    (under-confident) with two wrong: the gain is large and survives one more mistake: sharpened.
    The check counts: the kept fit's gain, with one more wrong image as confident as the median
    right one, is negative; the sharpened fit's stays positive."""
    from transfer_learning.model.calibration import nll

    g = torch.Generator().manual_seed(0)
    for margin, wrong, wrong_margin, sharpen in ((6.0, 1, 0.5, False), (1.5, 2, 1.5, True)):
        y = torch.randint(0, 5, (240,), generator=g)
        z = torch.randn(240, 5, generator=g) * 0.3 + margin * F.one_hot(y, 5)
        z[:wrong] = wrong_margin * F.one_hot(y[:wrong], 5).float()  # the mistakes: this confident
        y[:wrong] = (y[:wrong] + 1) % 5
        fit = choose_temperature(z, y, False)
        assert fit.fitted == sharpen, fit
        unrestricted = 0.05 if not sharpen else fit.temperature  # (what the fit alone would take)
        if not sharpen:
            assert "one more wrong image" in fit.why and "T = 0." in fit.why
            unrestricted = float(fit.why.split("T = ")[1].split()[0])
        assert unrestricted < 1
        confidence = z.softmax(1).amax(1)
        right = torch.nonzero(z.argmax(1) == y).flatten()
        i = int(right[confidence[right].argsort()[len(right) // 2]])
        z_more = torch.cat([z, z[i : i + 1]]).double()
        y_more = torch.cat([y, y.new_tensor([int(z[i].argsort(descending=True)[1])])])
        gain = float(nll(z_more, y_more, False) - nll(z_more / unrestricted, y_more, False))
        assert (gain > 0) == sharpen


def test_ece_nll_and_brier_match_their_definitions():
    logits, labels = calibrated_sample(500, 4, seed=3)
    probs = (logits * 2).softmax(-1)
    numbers = calibration_metrics(probs, labels, multilabel=False)
    # ECE by hand from the bins: sum over bins of |confidence - accuracy| weighted by the bin's share
    bins = reliability_bins(probs, labels, multilabel=False)
    assert len(bins) == ECE_BINS and sum(b["count"] for b in bins) == 500
    by_hand = sum(b["count"] / 500 * abs(b["confidence"] - b["accuracy"]) for b in bins if b["count"])
    assert numbers["ece"] == pytest.approx(by_hand, abs=1e-6)
    assert numbers["nll"] == pytest.approx(float(F.cross_entropy(logits * 2, labels)), abs=1e-5)
    one_hot = F.one_hot(labels, 4).float()
    assert numbers["brier"] == pytest.approx(float(((probs - one_hot) ** 2).sum(1).mean()), abs=1e-5)
    uniform = calibration_metrics(torch.full((8, 4), 0.25), torch.arange(4).repeat(2), False)
    assert uniform["brier"] == pytest.approx(0.75) and uniform["nll"] == pytest.approx(math.log(4))


def test_multilabel_thresholds_move_with_the_temperature_and_no_decision_changes():
    metrics = MultilabelMetrics(["a", "b", "c"])
    metrics.thresholds = torch.tensor([0.3, 0.5, 0.8])
    logits = torch.randn(200, 3) * 3
    before = metrics.decide(metrics.probabilities(logits))
    metrics.set_temperature(2.5)
    assert metrics.probabilities(logits) == pytest.approx((logits / 2.5).sigmoid(), abs=1e-6)
    assert metrics.decide(metrics.probabilities(logits)) == before
    assert metrics.thresholds[1] == pytest.approx(0.5)  # logit 0 stays 0
    metrics.set_temperature(0.7)  # from one temperature to another
    assert metrics.decide(metrics.probabilities(logits)) == before


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_run_is_calibrated_and_eval_predict_and_export_use_its_temperature(
    trained_run, shapes_dir, tmp_path
):
    from forkrun import run_python

    from transfer_learning.results.export import read_metadata
    from transfer_learning.run.checkpoints import safe_load

    summary = json.loads((trained_run / "summary.json").read_text())
    checkpoint = best_checkpoint(trained_run)
    stored = safe_load(checkpoint)["calibration"]
    temperature = stored["temperature"]
    assert 0.05 <= temperature <= 20 and temperature != 1.0
    assert str(summary["calibration"]).startswith(f"temperature {temperature:.3f}")
    assert stored["val_nll_after"] <= stored["val_nll_before"]  # what the fit minimises
    for key in ("ece", "nll", "brier"):
        assert summary[f"test/{key}"] >= 0 and summary[f"test/{key}_uncalibrated"] >= 0
    assert (trained_run / "reliability_diagram.png").stat().st_size > 10_000
    report = (trained_run / "report.md").read_text()
    assert "## Calibration (test)" in report and "reliability_diagram.png" in report

    # eval.py on the same test split: its numbers, computed from the calibrated probabilities
    # (temperature 1 by mapping them back), match the run's, computed from the raw logits.
    work = tmp_path / "work"
    shutil.copytree(trained_run, work / "run")  # eval writes a threshold file beside the checkpoint
    copied = best_checkpoint(work / "run")
    result = run_python([REPO / "eval.py", f"ckpt_path={copied}", f"hydra.run.dir={work}/eval",
                         "data.num_workers=0"], cwd=work)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((work / "eval" / "eval.json").read_text())
    numbers = evaluated["calibration"]
    # the same test images as the run's, so the same accuracy interval
    bounds = [summary["test/acc_ci95_low"], summary["test/acc_ci95_high"]]
    assert evaluated["accuracy_ci95"] == pytest.approx(bounds)
    assert "95 % [" in result.stdout
    assert numbers["temperature"] == pytest.approx(temperature)
    for key in ("ece", "nll", "brier"):
        assert numbers["calibrated"][key] == pytest.approx(summary[f"test/{key}"], abs=1e-5), key
        assert numbers["uncalibrated"][key] == pytest.approx(summary[f"test/{key}_uncalibrated"], abs=1e-5)
    assert "calibration (temperature" in result.stdout

    # predict gives eval's calibrated probabilities for the same images
    rows = read_rows(work / "eval" / "predictions.csv")
    names = [k for k in rows[0] if k not in ("file", "true", "predicted", "confidence")]
    output = work / "predict.csv"
    result = run_python(["-m", "transfer_learning.results.predict", f"ckpt_path={copied}",
                         f"images={shapes_dir}", f"output={output}", "num_workers=0"], cwd=work)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = {str(Path(r["file"]).resolve()): r for r in read_rows(output)}
    for row in rows:  # the test split's images, among all of them
        got = [float(predicted[str(Path(row["file"]).resolve())][f"prob_{n}"]) for n in names]
        assert got == pytest.approx([float(row[n]) for n in names], abs=1e-5)

    # the exported file says which temperature turns its logits into those probabilities
    exported = work / "model.onnx"
    result = run_python([REPO / "scripts" / "export.py", f"ckpt_path={copied}", f"output={exported}",
                         f"images={shapes_dir}", "max_images=4"], cwd=work)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metadata(exported)["temperature"] == pytest.approx(temperature)


@pytest.mark.slow
def test_calibrate_false_keeps_the_networks_probabilities(shapes_dir, tmp_path):
    from transfer_learning.model.module import TransferLearningModule
    from transfer_learning.run.checkpoints import safe_load

    result = run_cli(tmp_path, f"data.root={shapes_dir}", "input.image_size=32", "trainer.max_epochs=1",
                     "logger=csv", "worst_samples=0", "calibrate=false")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["calibration"].startswith("off (calibrate=false)")
    for key in ("ece", "nll", "brier"):  # still measured, and the same: temperature 1
        assert summary[f"test/{key}"] == summary[f"test/{key}_uncalibrated"]
    checkpoint = best_checkpoint(tmp_path / "run")
    assert "calibration" not in safe_load(checkpoint)
    assert TransferLearningModule.load_for_inference(checkpoint).temperature == 1.0


@pytest.mark.parametrize("temperature", [1e-300, 1e300, float("nan"), "2.0", True, 2.0])
def test_a_checkpoints_temperature_is_taken_only_within_the_fits_range(shapes_dir, temperature):
    from helpers import build

    module, _ = build(shapes_dir)
    module.on_load_checkpoint(
        {"hyper_parameters": dict(module.hparams), "calibration": {"temperature": temperature}}
    )
    assert module.temperature == (2.0 if temperature == 2.0 and temperature is not True else 1.0)
    probs = module.probabilities(torch.randn(4, len(module.class_names)) * 50)
    assert torch.isfinite(probs).all()


# What calibration may cost on the test split and still count as "not worse": the ECE of 30-60
# test images moves by a few hundredths with one image, so 0.02; the NLL by 2 % plus 0.005.
ECE_TOLERANCE, NLL_TOLERANCE = 0.02, (1.02, 0.005)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["feature_extract", "finetune"])
def test_calibration_does_not_worsen_the_demos_test_probabilities_on_several_seeds(tmp_path, strategy):
    """The README's first command (feature extraction on the demo) and the demo fine-tune, shrunk
    (30 images per class, 64 px, 2 epochs), on three seeds: the summary says what calibration did,
    and test NLL and ECE after it are no worse than before, within the tolerances above."""
    from helpers import train_cli

    data = tmp_path / "data"
    for seed in (0, 1, 2):
        work = tmp_path / f"seed{seed}"
        work.mkdir()
        result = train_cli(work, f"strategy={strategy}", f"seed={seed}", "trainer.max_epochs=2",
                           "input.image_size=64", f"data.root={data}", f"data.generate.root={data}",
                           "data.generate.images_per_class=30", "data.num_workers=0", "worst_samples=0",
                           "logger=csv")  # fmt: skip
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        summary = json.loads(next((work / "logs").rglob("summary.json")).read_text())
        line = str(summary["calibration"])
        assert line.startswith("temperature ") and ("val images" in line or "val split" in line), line
        assert summary["test/ece"] <= summary["test/ece_uncalibrated"] + ECE_TOLERANCE, (seed, line)
        ratio, slack = NLL_TOLERANCE
        assert summary["test/nll"] <= summary["test/nll_uncalibrated"] * ratio + slack, (seed, line)
        if line.startswith("temperature 1 kept"):
            assert summary["test/nll"] == pytest.approx(summary["test/nll_uncalibrated"], abs=1e-9)
