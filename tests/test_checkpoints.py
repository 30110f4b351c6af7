"""Checkpoints: atomic writes, pickle-free reads on every path, preemption, clear errors."""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from forkrun import run_python, start_python

from helpers import REPO, assert_same_weights, build, run_cli, train_cli, trainer
from transfer_learning.results.predict import Classifier
from transfer_learning.run.checkpoints import CheckpointError, SafeCheckpointIO, atomic_save, safe_load


def read_metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


class Trap:
    """Unpickling this creates a file: the proof that a load ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def crafted_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"payload": Trap(marker)}}, path)
    assert not marker.exists()
    return path, marker


def test_a_failed_write_leaves_the_previous_checkpoint_whole(tmp_path, shapes_dir, monkeypatch):
    module, datamodule = build(shapes_dir)
    run = trainer(max_epochs=1, plugins=[SafeCheckpointIO()], default_root_dir=str(tmp_path))
    run.fit(module, datamodule)
    path = tmp_path / "last.ckpt"
    run.save_checkpoint(path)
    before, head = path.read_bytes(), module.net.head.weight.detach().clone()

    def disk_full(fd):  # the bytes are written, the flush to disk fails: ENOSPC
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    module.net.head.weight.data += 1  # the next save would differ
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*No space left on device"):
        run.save_checkpoint(path)
    monkeypatch.undo()
    assert path.read_bytes() == before  # untouched, and still a loadable checkpoint
    assert torch.equal(safe_load(path)["state_dict"]["net.head.weight"], head)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []  # no debris


def test_atomic_save_replaces_the_file_in_one_step(tmp_path):
    path = tmp_path / "sub" / "x.ckpt"
    atomic_save({"a": torch.ones(2)}, path)
    atomic_save({"a": torch.zeros(2)}, path)
    assert torch.equal(safe_load(path)["a"], torch.zeros(2))
    assert [p.name for p in path.parent.iterdir()] == ["x.ckpt"]


def test_checkpoint_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint .*missing\.ckpt does not exist"):
        safe_load(tmp_path / "missing.ckpt")
    good = tmp_path / "good.ckpt"
    atomic_save({"state_dict": {"w": torch.randn(64, 64)}}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(
        CheckpointError, match=r"cannot read checkpoint .*truncated\.ckpt .*truncated or corrupt"
    ):
        safe_load(truncated)


def test_a_crafted_checkpoint_is_refused_by_the_python_api_even_when_forced(tmp_path, monkeypatch):
    path, marker = crafted_checkpoint(tmp_path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.ckpt"):
        Classifier.from_checkpoint(path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        SafeCheckpointIO().load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.slow
def test_a_crafted_checkpoint_is_refused_on_resume_and_on_predict(tmp_path, shapes_dir):
    path, marker = crafted_checkpoint(tmp_path)
    forced = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    resume = run_cli(tmp_path, f"data.root={shapes_dir}", f"ckpt_path={path}", "logger=csv", env=forced)
    assert resume.returncode == 2
    output = resume.stdout + resume.stderr
    assert f"refusing to load {path}" in output and "Traceback" not in output
    image = next(shapes_dir.glob("circle/*.jpg"))
    predict = run_python(
        ["-m", "transfer_learning.results.predict", f"ckpt_path={path}", f"images={image}"],
        cwd=tmp_path, env={**os.environ, **forced}, timeout=300,
    )  # fmt: skip
    assert predict.returncode == 2 and "refusing to load" in predict.stderr
    assert "Traceback" not in predict.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_resuming_from_another_models_or_other_classes_checkpoint_says_so(tmp_path, shapes_dir):
    first = run_cli(tmp_path, f"data.root={shapes_dir}", "input.image_size=48", "trainer.max_epochs=1",
                    "logger=csv")  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    other = tmp_path / "other"
    other.mkdir()
    (other / "a").symlink_to(shapes_dir / "circle")
    (other / "b").symlink_to(shapes_dir / "star")
    result = run_cli(tmp_path, "data=imagefolder", f"data.root={other}", f"ckpt_path={checkpoint}",
                     "logger=csv")  # fmt: skip
    assert result.returncode == 2
    assert (
        f"cannot resume from {checkpoint}: it was trained on 5 classes (circle, cross, square, star, "
        "triangle), this data has 2 (a, b)"
    ) in result.stdout + result.stderr
    result = run_cli(tmp_path, f"data.root={shapes_dir}", "model=resnet18", "model.weights=null",
                     f"ckpt_path={checkpoint}", "logger=csv")  # fmt: skip
    assert result.returncode == 2
    assert "it holds a efficientnet_lite0, this run builds a resnet18" in result.stdout + result.stderr


@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint_logs_why_and_exits_non_zero(tmp_path, shapes_dir):
    """SIGTERM during fine-tuning (epochs of a few seconds): a fresh last.ckpt, the reason in
    train.log, exit code 143; resuming from that checkpoint finishes the run."""
    args = [f"data.root={shapes_dir}", "input.image_size=48", "data.batch_size=8", "strategy=finetune",
            "logger=csv", "trainer.max_epochs=40"]  # fmt: skip
    command = [REPO / "train.py", f"hydra.run.dir={tmp_path}/run", "data.num_workers=0", *args]
    process = start_python(command, tmp_path, output=tmp_path / "output.txt")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert last.exists(), process.communicate()[0][-3000:]
    first = safe_load(last)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 143, output[-3000:]
    saved = safe_load(last)
    assert saved["global_step"] > first["global_step"]  # a new checkpoint, at the interrupted step
    log = (tmp_path / "run" / "train.log").read_text()
    assert "Received SIGTERM at epoch" in log and f"saved {last}" in log
    assert f"Resume with: python train.py ckpt_path={last}" in log
    assert not (tmp_path / "run" / "summary.json").exists()

    resumed = run_cli(tmp_path, *args, "trainer.max_epochs=2", f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs run"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("averaging", [[], ["callbacks=ema"]], ids=["plain", "ema"])
def test_sigkill_mid_epoch_then_resume_ends_with_the_uninterrupted_runs_weights(
    tmp_path, shapes_dir, averaging
):
    """Fine-tuning with augmentation and shuffling: killed (SIGKILL, no chance to save) during
    epoch 2 or later, resumed from last.ckpt, it ends where a run that was never stopped ends
    (with callbacks=ema: the same average, and the same weights being trained beside it)."""
    args = [f"data.root={shapes_dir}", "input.image_size=48", "data.batch_size=8", "strategy=finetune",
            "logger=csv", "trainer.max_epochs=4", "worst_samples=0", *averaging]  # fmt: skip
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir()
    killed.mkdir()
    reference = run_cli(straight, *args)
    assert reference.returncode == 0, reference.stderr[-3000:]

    command = [REPO / "train.py", f"paths.root_dir={killed}", f"hydra.run.dir={killed}/run",
               "data.num_workers=0", *args]  # fmt: skip
    process = start_python(command, killed)
    last = killed / "run" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if last.exists() and safe_load(last)["epoch"] >= 1:
            break
        time.sleep(0.1)
    time.sleep(0.5)  # into the next epoch
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    interrupted_at = safe_load(last)
    assert 1 <= interrupted_at["epoch"] < 4

    resumed = run_cli(killed, *args, f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(killed / "run", straight / "run")
    expected = safe_load(straight / "run" / "checkpoints" / "last.ckpt")["state_dict"]
    trained = interrupted_at["state_dict"]["net.head.weight"]
    assert not torch.allclose(trained, expected["net.head.weight"])  # the resumed epochs did train
    if averaging:
        assert "current_model_state" in interrupted_at  # the average and the trained weights, both resumed


@pytest.mark.slow
def test_ckpt_path_last_continues_the_latest_run_in_its_own_folder(tmp_path, shapes_dir):
    data = ["data=imagefolder", f"data.root={shapes_dir}", "input.image_size=48", "data.num_workers=0",
            "strategy=finetune", "data.batch_size=8"]  # fmt: skip
    first = train_cli(tmp_path, *data, "trainer.max_epochs=2")
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    best_before = max(float(r["val/acc_best"]) for r in read_metrics(run) if r["val/acc_best"])
    (first_wandb,) = (run / "wandb").glob("offline-run-*")

    again = train_cli(tmp_path, *data, "trainer.max_epochs=3", "ckpt_path=last")
    assert again.returncode == 0, again.stderr[-3000:]
    assert list((tmp_path / "logs" / "train" / "runs").iterdir()) == [run]  # no second folder
    rows = read_metrics(run)
    validations = [int(r["epoch"]) for r in rows if r["val/acc"]]
    assert validations == [0, 1, 2]  # one history: each epoch once
    assert sum(1 for r in rows if r["test/acc"]) == 1  # the first run's test is gone
    assert float(next(r for r in rows if r["val/acc"] and r["epoch"] == "2")["val/acc_best"]) >= best_before
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs run"] == 3 and summary["output dir"] == str(run)
    ids = {p.name.rsplit("-", 1)[-1] for p in (run / "wandb").glob("offline-run-*")}
    assert ids == {first_wandb.name.rsplit("-", 1)[-1]}  # the W&B run resumed under its id
    log = (run / "train.log").read_text()
    assert log.count("Restoring states from the checkpoint path") >= 2  # both commands logged here

    nothing = tmp_path / "empty"
    nothing.mkdir()
    missing = train_cli(nothing, *data, "ckpt_path=last")
    assert missing.returncode == 2
    assert "ckpt_path=last, but no run under" in missing.stderr
