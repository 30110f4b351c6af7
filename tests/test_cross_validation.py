"""k-fold cross-validation (cv=K): folds that partition the training+validation images,
stratified and seeded, with the test split untouched; real cv runs whose summary is the folds'
mean and std, whose out-of-fold predictions come from the fold that did not train on each
image, whose backbone features are computed once; a fold killed mid-training resumes without
redoing the finished ones."""

from __future__ import annotations

import csv
import json
import signal
import statistics
import time
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from test_eval import eval_cli
from test_resume_exact import stop_at

from helpers import run_cli
from transfer_learning.cli.hydra_entry import _cv_shorthand
from transfer_learning.data.sources.base import Listing
from transfer_learning.data.splits import REFIT, check_folds, fold_numbers, fold_split, split_listing
from transfer_learning.errors import ConfigError
from transfer_learning.pipelines.cross_validation import SHOWN, read_fold
from transfer_learning.readers import UntrustedFileError
from transfer_learning.run.resume import fold_of_checkpoint, run_folder_of

FRACTIONS = {"val": 0.2, "test": 0.2}


def listing(per_class: tuple[int, ...] = (30, 20, 10), multilabel: bool = False) -> Listing:
    files, targets = [], []
    for label, count in enumerate(per_class):
        for i in range(count):
            files.append(Path(f"c{label}/{i}.jpg"))
            targets.append(sorted({label, (label + i) % len(per_class)}) if multilabel else [label])
    task = "multilabel" if multilabel else "multiclass"
    return Listing(files, targets, [f"c{k}" for k in range(len(per_class))], task, where="test")


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_folds_partition_the_training_and_validation_images_stratified(folds):
    data = listing()
    numbers = fold_numbers(data, FRACTIONS, seed=1, folds=folds)
    base = split_listing(data, FRACTIONS, seed=1)
    assert sorted(numbers) == sorted(base["train"] + base["val"])  # every non-test image, once
    assert set(numbers.values()) == set(range(folds))
    for label in range(3):  # each class dealt evenly: fold shares differ by at most one image
        per_fold = Counter(k for i, k in numbers.items() if data.targets[i] == [label])
        assert max(per_fold.values()) - min(per_fold.values()) <= 1, (label, per_fold)
    for fold in range(folds):
        split = fold_split(data, FRACTIONS, 1, folds, fold)
        assert split["test"] == base["test"]  # held out exactly as without folds
        assert split["val"] == sorted(i for i, k in numbers.items() if k == fold)
        assert set(split["train"]) | set(split["val"]) == set(numbers)
        assert not set(split["train"]) & set(split["val"])
    assert fold_numbers(data, FRACTIONS, seed=1, folds=folds) == numbers  # seeded
    assert fold_numbers(data, FRACTIONS, seed=2, folds=folds) != numbers
    refit = fold_split(data, FRACTIONS, 1, folds, REFIT)  # cv.refit=true: every fold trains, no val
    assert refit == {"train": sorted(numbers), "test": base["test"]}


def test_multilabel_folds_give_every_class_to_every_fold():
    data = listing((12, 12, 12, 12), multilabel=True)
    numbers = fold_numbers(data, FRACTIONS, seed=0, folds=3)
    for fold in range(3):
        present = {c for i, k in numbers.items() if k == fold for c in data.targets[i]}
        assert present == {0, 1, 2, 3}, fold


def test_fold_settings_that_cannot_work_name_the_fix():
    with pytest.raises(ConfigError, match=r"cv=5: class 'c2' has 4 training\+validation image\(s\).*cv=4\)"):
        fold_numbers(listing((20, 20, 5)), FRACTIONS, seed=0, folds=5)
    for bad in (1, 11, "abc", 2.5, True):
        with pytest.raises(ConfigError, match=r"cv.folds=.*2 to 10 folds \(cv=5\), or none"):
            check_folds(bad)
    assert check_folds(None) is None and check_folds(4) == 4
    with pytest.raises(ConfigError, match=r"data\.cv_fold=3: a fold of 3 is 0 to 2"):
        fold_split(listing(), FRACTIONS, 0, 3, 3)


def test_cv_on_the_command_line_is_short_for_cv_folds():
    assert _cv_shorthand("cv=5") == "cv.folds=5"
    assert _cv_shorthand("cv=3,5") == "cv.folds=3,5"
    assert _cv_shorthand("cv=none") == "cv.folds=null"
    assert _cv_shorthand("cv.refit=true") == "cv.refit=true"
    assert _cv_shorthand("cvx=1") == "cvx=1"


def test_a_fold_checkpoint_belongs_to_its_cv_run(tmp_path):
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    checkpoint = tmp_path / "run" / "folds" / "fold2" / "checkpoints" / "last.ckpt"
    assert fold_of_checkpoint(checkpoint) == (tmp_path / "run", 2)
    assert run_folder_of(checkpoint) == tmp_path / "run"
    assert fold_of_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt") is None
    refit = tmp_path / "run" / "folds" / "refit" / "checkpoints" / "refit-epoch03.ckpt"
    assert fold_of_checkpoint(refit) == (tmp_path / "run", REFIT) and run_folder_of(refit) == tmp_path / "run"
    assert fold_of_checkpoint(tmp_path / "run" / "folds" / "refitx" / "checkpoints" / "a.ckpt") is None


def test_a_crafted_fold_record_is_refused(tmp_path):
    path = tmp_path / "fold.json"
    good = {"fold": 1, "folds": 3, "metrics": {"val/acc": 0.9}, "summary": {"test/acc": 0.9}}
    path.write_text(json.dumps(good))
    assert read_fold(path, 1, 3)["metrics"] == {"val/acc": 0.9}
    crafted = ({**good, "fold": 2}, {**good, "metrics": {"x": {"_target_": "os.system"}}}, [1, 2],
               {**good, "intervals": {"test/acc": ["x"]}}, {**good, "intervals": {"evil": "x"}})  # fmt: skip
    for bad in crafted:
        path.write_text(json.dumps(bad))
        with pytest.raises(UntrustedFileError, match=f"refusing {path}"):
            read_fold(path, 1, 3)


# -- real cv runs ----------------------------------------------------------------------------

TINY = ["input.image_size=48", "trainer.max_epochs=2", "logger=csv", "worst_samples=0", "data.batch_size=16"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_cv_run_summarises_its_folds_and_predicts_every_image_out_of_fold(shapes_dir, tmp_path):
    result = run_cli(tmp_path, f"data.root={shapes_dir}", "cv=3", *TINY)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    folds = [json.loads((run / "folds" / f"fold{k}" / "summary.json").read_text()) for k in range(3)]
    for key in ("best val/acc", "test/acc", "test/f1", "test/ece"):
        values = [f[key] for f in folds]
        want = f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"
        assert summary[key] == want and want in result.stdout, key
        assert summary[f"{key} per fold"] == ", ".join(f"{v:.4f}" for v in values)
        assert summary["cv"][key]["folds"] == pytest.approx(values)
    assert set(summary["cv"]) <= set(SHOWN)
    # Every fold: the same test images; its val is one fold, disjoint from its train.
    sizes = [tuple(int(n) for n in f["images train/val/test"].split("/")) for f in folds]
    assert len({s[2] for s in sizes}) == 1 and len({s[0] + s[1] for s in sizes}) == 1
    tests = [
        json.loads((run / "folds" / f"fold{k}" / "test_predictions.json").read_text())["files"]
        for k in range(3)
    ]
    assert tests[0] == tests[1] == tests[2]
    # Out-of-fold: every train+val image once, from the fold that validated on it.
    rows = read_csv(run / "oof_predictions.csv")
    names = ["circle", "cross", "square", "star", "triangle"]
    assert list(rows[0]) == ["file", "label", "fold", *(f"prob_{n}" for n in names)]
    assert len(rows) == sizes[0][0] + sizes[0][1] == len({r["file"] for r in rows})
    assert not {r["file"] for r in rows} & set(tests[0])
    for k in range(3):
        fold_val = json.loads((run / "folds" / f"fold{k}" / "fold_predictions.json").read_text())
        assert sorted(fold_val["files"]) == sorted(r["file"] for r in rows if r["fold"] == str(k))
        assert len(fold_val["files"]) == sizes[k][1]
    for row in rows:
        assert sum(float(row[f"prob_{n}"]) for n in names) == pytest.approx(1, abs=1e-4)
        assert row["label"] == Path(row["file"]).parent.name
    # The backbone ran once for all folds' train+val images (one cache file), once for test.
    assert folds[0]["feature cache"].startswith("2 built, 0 reused")
    assert all(f["feature cache"].startswith("0 built, 2 reused") for f in folds[1:])


class PauseInFold(Callback):
    """Test probe: in fold ``fold`` of a cv run, at the first training batch of ``epoch``, write
    ``marker`` and wait (until SIGKILL ends the process; at most five minutes)."""

    def __init__(self, marker: str, fold: int, epoch: int) -> None:
        self.marker, self.fold, self.epoch = Path(marker), fold, epoch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx) -> None:
        folder = str(trainer.checkpoint_callback.dirpath)  # type: ignore[union-attr]
        if (
            f"/folds/fold{self.fold}/" in folder + "/"
            and trainer.current_epoch == self.epoch
            and batch_idx == 0
        ):
            self.marker.write_text("here\n")
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                time.sleep(0.01)


@pytest.mark.slow
def test_a_killed_fold_resumes_and_the_finished_folds_are_not_redone(shapes_dir, tmp_path):
    probe = [f"+callbacks.pause._target_={__name__}.PauseInFold", "+callbacks.pause.fold=1",
             f"+callbacks.pause.marker={tmp_path / 'marker'}", "+callbacks.pause.epoch=1"]  # fmt: skip
    code, output = stop_at(tmp_path, signal.SIGKILL, f"data.root={shapes_dir}", "cv=3", *TINY, *probe)
    assert code == -signal.SIGKILL, output[-3000:]
    run = tmp_path / "run"
    finished = run / "folds" / "fold0"
    before = {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file()}
    assert (finished / "fold.json").is_file() and not (run / "folds" / "fold1" / "fold.json").exists()
    last = run / "folds" / "fold1" / "checkpoints" / "last.ckpt"
    assert last.is_file() and not (run / "summary.json").exists()

    resumed = run_cli(tmp_path, f"ckpt_path={last}")
    said = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, said[-3000:]
    assert "Fold 1 of 3 finished before" in said and "Continuing" in said
    assert "+callbacks.pause" in said  # the probe was not restored (a + addition), with a warning
    assert {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file()} == before
    fold1 = json.loads((run / "folds" / "fold1" / "summary.json").read_text())
    assert fold1["epochs run"] == 2
    rows = read_csv(run / "folds" / "fold1" / "csv" / "metrics.csv")
    assert sorted({int(r["epoch"]) for r in rows if r.get("val/acc")}) == [0, 1]  # one history, no repeat
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["cv"]["test/acc"]["folds"]) == 3
    assert len(read_csv(run / "oof_predictions.csv")) == sum(
        len(json.loads((run / "folds" / f"fold{k}" / "fold_predictions.json").read_text())["files"])
        for k in range(3)
    )


@pytest.mark.slow
def test_a_multirun_compares_settings_on_cross_validated_numbers(shapes_dir, tmp_path):
    """`python train.py -m strategy.head_lr=...,... cv=2`: each job a cv run; the sweep table ranks
    them by the mean over folds and gives the spread."""
    from helpers import read_sweep_table, sweep_dirs, train_cli

    data = ["data=imagefolder", f"data.root={shapes_dir}", "data.num_workers=0"]
    result = train_cli(tmp_path, "-m", *data, *TINY, "cv=2", "strategy.head_lr=0.001,0.03")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (sweep,) = sweep_dirs(tmp_path)
    rows = read_sweep_table(sweep)
    assert len(rows) == 2
    for row in rows:
        summary = json.loads((Path(row["output_dir"]) / "summary.json").read_text())
        val, test = summary["cv"]["best val/acc"], summary["cv"]["test/acc"]
        assert float(row["val/acc_best"]) == pytest.approx(statistics.fmean(val["folds"]), abs=1e-4)
        assert float(row["test/acc"]) == pytest.approx(statistics.fmean(test["folds"]), abs=1e-4)
        assert row["cv ± std"] == f"2 folds: ± {val['std']:.4f}, ± {test['std']:.4f}"
        assert (Path(row["output_dir"]) / "oof_predictions.csv").is_file()
    assert float(rows[0]["val/acc_best"]) >= float(rows[1]["val/acc_best"])


@pytest.mark.slow
def test_refit_trains_the_final_model_on_every_fold_calibrated_out_of_fold(shapes_dir, tmp_path):
    """cv.refit=true: after the folds, one model on every training+validation image (no val
    split), its temperature fitted on the folds' out-of-fold logits, tested on the same test
    images; the cv summary gives its numbers and checkpoint, which eval reproduces."""
    result = run_cli(tmp_path, f"data.root={shapes_dir}", "cv=2", "cv.refit=true", *TINY)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    refit = json.loads((run / "folds" / "refit" / "summary.json").read_text())
    fold = json.loads((run / "folds" / "fold0" / "summary.json").read_text())
    (tmp_path / "fold").mkdir()
    train, val, test = (int(n) for n in fold["images train/val/test"].split("/"))
    assert refit["images train/test"] == f"{train + val}/{test}"  # every non-test image trains
    assert refit.get("best val/acc") is None  # nothing to validate on
    metrics = read_csv(run / "folds" / "refit" / "csv" / "metrics.csv")
    assert not any(r.get("val/acc") for r in metrics) and any(r.get("train/acc") for r in metrics)
    tests = [json.loads((run / "folds" / k / "test_predictions.json").read_text())["files"]
             for k in ("fold0", "refit")]  # fmt: skip
    assert tests[0] == tests[1]
    # The checkpoint: the last epoch's, calibrated on every out-of-fold image.
    checkpoint = run / "folds" / "refit" / "checkpoints" / "refit-epoch01.ckpt"
    assert summary["checkpoint (refit: for eval, predict, export)"] == str(checkpoint)
    from transfer_learning.model.calibration import choose_temperature
    from transfer_learning.pipelines.cross_validation import oof_logits
    from transfer_learning.run.checkpoints import safe_load

    calibration = safe_load(checkpoint)["calibration"]
    logits, targets = oof_logits(run, 2)
    assert calibration["fitted_on"] == "out-of-fold" and calibration["images"] == train + val == len(targets)
    assert calibration["temperature"] == pytest.approx(choose_temperature(logits, targets, False).temperature)
    assert "out-of-fold images" in refit["calibration"]
    for key in ("test/acc", "test/f1"):
        assert summary[f"refit {key}"] == pytest.approx(refit[key])
        assert summary[f"refit {key} 95 %"] == refit[f"{key} 95 %"]
    assert "refit test/acc" in result.stdout
    evaluated = eval_cli(tmp_path, f"ckpt_path={checkpoint}")
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    eval_json = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert eval_json["accuracy"] == pytest.approx(refit["test/acc"], abs=1e-6)
    # A fold's checkpoint evaluates on that fold's own split (its run_config.yaml): val is the fold.
    fold_eval = eval_cli(tmp_path / "fold", f"ckpt_path={fold['best checkpoint']}", "split=val")
    assert fold_eval.returncode == 0, fold_eval.stdout[-3000:] + fold_eval.stderr[-3000:]
    fold_json = json.loads((tmp_path / "fold" / "eval" / "eval.json").read_text())
    assert fold_json["images"] == val
    assert fold_json["accuracy"] == pytest.approx(fold["best val/acc"], abs=1e-6)
    wrong = eval_cli(tmp_path, f"ckpt_path={checkpoint}", "split=val")
    assert wrong.returncode != 0 and "no val split (cv.refit=true" in wrong.stdout + wrong.stderr
    # Run again: folds and refit are read back, not trained again.
    before = checkpoint.stat().st_mtime_ns
    again = run_cli(tmp_path, f"data.root={shapes_dir}", "cv=2", "cv.refit=true", *TINY)
    assert again.returncode == 0 and "The refit finished before" in again.stdout + again.stderr
    assert checkpoint.stat().st_mtime_ns == before
    assert json.loads((run / "summary.json").read_text())["refit test/acc"] == summary["refit test/acc"]


@pytest.mark.slow
def test_multilabel_refit_takes_its_thresholds_from_the_out_of_fold_predictions(multilabel_dir, tmp_path):
    from transfer_learning.model.metrics import choose_thresholds
    from transfer_learning.pipelines.cross_validation import oof_logits
    from transfer_learning.run.checkpoints import safe_load

    data = ["data=csv", f"data.file={multilabel_dir / 'labels.csv'}", "data.label_column=labels"]
    result = run_cli(tmp_path, *data, "task=multilabel", "cv=2", "cv.refit=true", *TINY)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "run"
    (checkpoint,) = (run / "folds" / "refit" / "checkpoints").glob("refit-*.ckpt")
    saved = safe_load(checkpoint)
    logits, targets = oof_logits(run, 2)
    temperature = saved["calibration"]["temperature"]
    want = choose_thresholds((logits.double() / temperature).sigmoid(), targets)
    assert saved["thresholds"] == pytest.approx(want.tolist(), abs=1e-6)
    assert saved["calibration"]["fitted_on"] == "out-of-fold"


def test_the_linear_probe_without_a_validation_split_needs_one_l2_strength():
    """cv.refit=true with strategy=lp_ft: no val split to choose the probe's L2 strength on, so
    it must be given (the folds' summaries say which each chose); with one it fits on train."""
    from torch import nn

    from transfer_learning.model.strategies.lp_ft import fit_linear_head

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (60,), generator=g)
    x = torch.randn(60, 8, generator=g) + 3 * nn.functional.one_hot(y, 8).float()
    wanted = r"decays=\[0.001, 0.01\]: without a valid.*probe_weight_decays=\[1e-3\]"
    with pytest.raises(ConfigError, match=wanted):
        fit_linear_head(nn.Linear(8, 3), (x, y), None, [1e-3, 1e-2], 50)
    head = nn.Linear(8, 3)
    result = fit_linear_head(head, (x, y), None, [1e-3], 50)
    assert set(result) == {"weight_decay", "train_acc"} and result["train_acc"] > 0.9
    assert float((head(x).argmax(1) == y).float().mean()) == pytest.approx(result["train_acc"])


def test_refit_with_a_scheduler_that_watches_validation_stops_before_any_fold(shapes_dir, tmp_path):
    result = run_cli(tmp_path, f"data.root={shapes_dir}", "cv=2", "cv.refit=true", "scheduler=plateau", *TINY)
    said = result.stdout + result.stderr
    assert result.returncode != 0 and "cv.refit=true with scheduler.monitor=val/loss" in said, said[-2000:]
    assert "scheduler=cosine" in said and not (tmp_path / "run" / "folds").exists()
