"""Stopped and resumed runs end where a run that was never stopped ends; SIGTERM in any phase
exits 143 with a message; a checkpoint that cannot be written says why.

The end-to-end tests stop real `python train.py` processes with real signals, sent from
outside. To know where a run is, a probe callback (:class:`PauseAt`, put in with tests/ on
PYTHONPATH) writes a marker file at a chosen batch and waits there until the signal comes; the
signal for the data scan goes as soon as the run starts, with thousands of images to check.
"""

from __future__ import annotations

import csv
import errno
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from forkrun import Started, start_python
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from helpers import REPO, assert_same_weights, finished_run, run_cli
from transfer_learning.run.checkpoints import CheckpointError, atomic_save, safe_load
from transfer_learning.run.loggers import CSVLogger
from transfer_learning.run.preemption import SaveOnPreemption

PROBES = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
# Fine-tuning (augmentation, shuffling, dropout) with two loader worker processes, a loss row at
# every step: 6 training batches and 2 validation batches per epoch.
ARGS = ["input.image_size=48", "data.batch_size=8", "data.num_workers=2", "strategy=finetune", "logger=csv",
        "trainer.max_epochs=2", "trainer.log_every_n_steps=1", "worst_samples=0"]  # fmt: skip
BATCHES_PER_EPOCH = 6


class PauseAt(Callback):
    """Test probe: at ``hook`` (on_train_batch_start, on_validation_batch_start or
    on_test_batch_start) of batch ``batch`` in epoch ``epoch`` (-1: any), write ``marker`` (the
    global step) and wait there until SIGTERM arrives (or SIGKILL ends the process); at most
    five minutes. Sanity-check batches are not counted."""

    def __init__(self, hook: str, marker: str, batch: int = 0, epoch: int = -1) -> None:
        self.hook, self.marker, self.batch, self.epoch = hook, Path(marker), batch, epoch
        self.arrived = False

    def _arrive(self, trainer: L.Trainer, hook: str, batch_idx: int) -> None:
        if hook != self.hook or self.arrived or trainer.sanity_checking or batch_idx != self.batch:
            return
        if self.epoch not in (-1, trainer.current_epoch):
            return
        self.arrived = True
        self.marker.write_text(f"{trainer.global_step}\n")
        deadline = time.monotonic() + 300
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.01)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._arrive(trainer, "on_train_batch_start", batch_idx)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._arrive(trainer, "on_validation_batch_start", batch_idx)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._arrive(trainer, "on_test_batch_start", batch_idx)


def start(folder: Path, *overrides: str) -> Started:
    """`python train.py` in ``folder`` (outputs in ``folder/run``), as helpers.run_cli runs it,
    but not waited for; stdout and stderr go to ``folder/output.txt``."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [REPO / "train.py", f"paths.root_dir={folder}", f"hydra.run.dir={folder}/run",
               "data.num_workers=0", *overrides]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", **PROBES}
    return start_python(command, folder, env, new_session=True, output=folder / "output.txt")


def pause_at(hook: str, folder: Path, batch: int = 0, epoch: int = -1) -> list[str]:
    return [f"+callbacks.pause._target_={__name__}.PauseAt", f"+callbacks.pause.hook={hook}",
            f"+callbacks.pause.marker={folder / 'marker'}", f"+callbacks.pause.batch={batch}",
            f"+callbacks.pause.epoch={epoch}"]  # fmt: skip


def wait_for(condition: Any, process: Started, folder: Path, what: str) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            output = (folder / "output.txt").read_text()[-3000:]
            pytest.fail(f"the run never reached {what} (exit code {process.returncode}):\n{output}")
        time.sleep(0.05)


def stop_at(folder: Path, sig: signal.Signals, *overrides: str, group: bool = False) -> tuple[int, str]:
    """Start a run that pauses where ``overrides`` (pause_at) say, send it ``sig`` there (with
    ``group``, to all its processes, loader workers included, as SLURM does), and return its
    exit code and output."""
    (folder / "marker").unlink(missing_ok=True)
    process = start(folder, *overrides)
    wait_for((folder / "marker").exists, process, folder, "the pause point")
    if group:
        os.killpg(process.pid, sig)
    else:
        process.send_signal(sig)
    process.wait(timeout=300)
    return process.returncode, (folder / "output.txt").read_text()


def metric_rows(run: Path) -> dict[tuple[int, frozenset[str]], dict[str, float]]:
    """metrics.csv as {(step, the columns the row fills): values}; each such row once."""
    with open(run / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    out: dict[tuple[int, frozenset[str]], dict[str, float]] = {}
    for row in rows:
        values = {k: float(v) for k, v in row.items() if v not in ("", None) and k != "step"}
        key = (int(row["step"]), frozenset(values))
        assert key not in out, f"two rows for step {row['step']} with {sorted(values)}"
        out[key] = values
    return out


def assert_same_history(run: Path, reference: Path, partial_epochs: tuple[int, ...] = ()) -> None:
    """The same metrics.csv rows as the reference run, value for value; every epoch validated
    once. ``partial_epochs``: epochs resumed mid-way, whose training averages (train/loss_epoch,
    train/acc) cover only the batches after the resume."""
    rows, expected = metric_rows(run), metric_rows(reference)
    assert sorted(rows, key=str) == sorted(expected, key=str)
    for key, values in expected.items():
        if values.get("epoch") in partial_epochs and "train/loss_epoch" in values:
            continue
        for name, value in values.items():
            assert math.isclose(rows[key][name], value, rel_tol=1e-4, abs_tol=1e-5), (key[0], name)
    validated = sorted(int(v["epoch"]) for v in rows.values() if "val/acc" in v)
    assert validated == list(range(len(validated))) and validated


@pytest.fixture(scope="module")
def straight(shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of the uninterrupted run every stopped run is compared with."""
    return finished_run(tmp_path_factory.mktemp("straight"), f"data.root={shapes_dir}", *ARGS)


# -- unit tests ------------------------------------------------------------------------------


def test_resuming_drops_the_rows_logged_at_and_after_the_checkpoint_step(tmp_path):
    """A checkpoint at global step G was saved after the batch logged as step G-1; the next
    batch logs as step G. Rows from step G on are logged again by the resumed run."""
    logger = CSVLogger(save_dir=str(tmp_path), name="csv", version="")
    for step in (4, 5, 6, 7):
        logger.log_metrics({"train/loss_step": float(step)}, step=step)
    logger.log_metrics({"val/acc": 0.5, "epoch": 0}, step=5)
    logger.log_metrics({"test/acc": 0.5}, step=8)
    logger.save()
    logger.drop_rows_after(6)
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["train/loss_step"] or r["val/acc"]) for r in rows] == [
        ("4", "4.0"), ("5", "5.0"), ("5", "0.5")
    ]  # fmt: skip


def test_a_checkpoint_that_cannot_be_written_names_the_file_the_free_space_and_the_fix(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    atomic_save({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):  # what torch.save raises when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError) as caught:
        atomic_save({"w": torch.zeros(3)}, path)
    message = str(caught.value)
    assert f"could not write checkpoint {path}" in message
    assert "free on the disk of" in message and "unexpected pos" in message
    assert f"{path} is untouched" in message and "free some space" in message
    monkeypatch.undo()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(CheckpointError, match=r"No space left on device.*free on the disk"):
        atomic_save({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_sigterm_outside_lightning_stops_at_once_and_says_nothing_was_trained(tmp_path):
    preemption = SaveOnPreemption(resumed_from=None)
    before = signal.getsignal(signal.SIGTERM)
    with preemption.handling_sigterm(), pytest.raises(SIGTERMException):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    assert signal.getsignal(signal.SIGTERM) is before  # put back
    message = str(preemption.preempted())
    assert message == (
        "stopped by SIGTERM (preemption or a scheduler's time limit) before training started; nothing "
        "was trained, so there is nothing to save: run the same command again"
    )
    resumed = SaveOnPreemption(resumed_from=str(tmp_path / "last.ckpt"))
    assert f"Resume with: python train.py <same overrides> ckpt_path={tmp_path / 'last.ckpt'}" in str(
        resumed.preempted()
    )


# -- end to end ------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_mid_epoch_with_loader_workers_then_resume_is_exact(tmp_path, shapes_dir, straight):
    """Killed (no chance to save) in the middle of epoch 1, after some of its rows were
    logged; resumed from last.ckpt (the end of epoch 0): the uninterrupted run's weights, and
    its metrics.csv row for row."""
    data = f"data.root={shapes_dir}"
    code, output = stop_at(tmp_path, signal.SIGKILL, data, *ARGS,
                           *pause_at("on_train_batch_start", tmp_path, batch=3, epoch=1))  # fmt: skip
    assert code == -signal.SIGKILL, output[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert safe_load(last)["global_step"] == BATCHES_PER_EPOCH  # the end of epoch 0
    resumed = run_cli(tmp_path, data, *ARGS, f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(tmp_path / "run", straight)
    assert_same_history(tmp_path / "run", straight)


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_that_step_and_resumes_exactly(tmp_path, shapes_dir, straight):
    """SIGTERM to every process of the run (loader workers too, as SLURM sends it) in the
    middle of epoch 1: a checkpoint at the interrupted step, exit 143 with the reason; the
    resumed run replays the epoch's data order and ends with the uninterrupted run's weights."""
    data = f"data.root={shapes_dir}"
    pause = pause_at("on_train_batch_start", tmp_path, batch=3, epoch=1)
    code, output = stop_at(tmp_path, signal.SIGTERM, data, *ARGS, *pause, group=True)
    assert code == 143, output[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert safe_load(last)["global_step"] == BATCHES_PER_EPOCH + 4  # batch 3 of epoch 1 finished
    assert f"Resume with: python train.py ckpt_path={last}" in output
    assert "Traceback" not in output and "killed by signal" not in output
    resumed = run_cli(tmp_path, data, *ARGS, f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "drew its first 4 batches again" in resumed.stdout + resumed.stderr
    assert_same_weights(tmp_path / "run", straight)
    assert_same_history(tmp_path / "run", straight, partial_epochs=(1,))


@pytest.mark.slow
def test_sigterm_during_validation_finishes_it_then_resumes_exactly(tmp_path, shapes_dir, straight):
    """SIGTERM (to every process) while epoch 0 is being validated: the validation finishes,
    the epoch's checkpoint is saved, the run exits 143; resumed, it validates every epoch once
    and ends with the uninterrupted run's weights and history."""
    data = f"data.root={shapes_dir}"
    pause = pause_at("on_validation_batch_start", tmp_path, batch=0, epoch=0)
    code, output = stop_at(tmp_path, signal.SIGTERM, data, *ARGS, *pause, group=True)
    assert code == 143, output[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    stopped = safe_load(last)
    assert stopped["global_step"] == BATCHES_PER_EPOCH  # the end of epoch 0
    assert any("val/acc" in values for values in metric_rows(tmp_path / "run").values())
    assert "Received SIGTERM at epoch 0" in output and f"saved {last}" in output
    resumed = run_cli(tmp_path, data, *ARGS, f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(tmp_path / "run", straight)
    assert_same_history(tmp_path / "run", straight)


@pytest.mark.slow
def test_resumes_keep_the_learning_rate_cuts_of_a_plateau_scheduler(tmp_path, shapes_dir):
    """scheduler=plateau cuts the rates after epochs 1 and 2 here (patience 0, and no epoch
    after the first "improves" on a falling validation loss). Killed in epoch 1, resumed,
    stopped again by SIGTERM in epoch 2 and resumed (no loader workers this time): the
    uninterrupted run's rates and weights. Lightning keeps no metrics in checkpoints and leaves
    out the scheduler's step at the end of the epoch a run resumes after, or in."""
    args = [f"data.root={shapes_dir}", *ARGS, "data.num_workers=0", "trainer.max_epochs=4",
            "scheduler=plateau", "scheduler.patience=0", "scheduler.mode=max"]  # fmt: skip
    (tmp_path / "straight").mkdir()
    reference = run_cli(tmp_path / "straight", *args)
    assert reference.returncode == 0, reference.stderr[-3000:]
    straight = tmp_path / "straight" / "run"
    rates = {v["lr-AdamW/head"] for v in metric_rows(straight).values() if "lr-AdamW/head" in v}
    assert len(rates) == 3  # cuts after epochs 1 and 2
    folder, last = tmp_path / "stopped", tmp_path / "stopped" / "run" / "checkpoints" / "last.ckpt"
    code, output = stop_at(folder, signal.SIGKILL, *args, *pause_at("on_train_batch_start", folder, 1, 1))
    assert code == -signal.SIGKILL, output[-3000:]
    code, output = stop_at(folder, signal.SIGTERM, *args, f"ckpt_path={last}",
                           *pause_at("on_train_batch_start", folder, 2, 2))  # fmt: skip
    assert code == 143, output[-3000:]
    resumed = run_cli(folder, *args, f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(folder / "run", straight)
    assert_same_history(folder / "run", straight, partial_epochs=(2,))


@pytest.mark.slow
def test_sigterm_during_the_test_exits_143_and_says_how_to_finish(tmp_path, shapes_dir, straight):
    """Training done, SIGTERM while testing: exit 143, a message naming the phase and how to
    finish; resuming from last.ckpt trains nothing more, tests and writes the summary."""
    data = f"data.root={shapes_dir}"
    code, output = stop_at(tmp_path, signal.SIGTERM, data, *ARGS,
                           *pause_at("on_test_batch_start", tmp_path, batch=0))  # fmt: skip
    assert code == 143, output[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert "stopped by SIGTERM (preemption or a scheduler's time limit) during the test" in output
    assert "training had finished" in output
    assert f"Resume with: python train.py ckpt_path={last}" in output
    assert "Traceback" not in output
    assert not (tmp_path / "run" / "summary.json").exists()
    resumed = run_cli(tmp_path, data, *ARGS, f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Run summary" in resumed.stdout
    assert_same_weights(tmp_path / "run", straight)
    assert_same_history(tmp_path / "run", straight)


@pytest.mark.slow
def test_sigterm_while_the_images_are_checked_exits_143_with_a_message(tmp_path, shapes_dir):
    """SIGTERM right after the run starts, while it checks (decodes) 3200 images before
    building the model: exit 143 and a message that nothing was trained."""
    data = tmp_path / "data"
    for folder in sorted(shapes_dir.iterdir()):
        (data / folder.name).mkdir(parents=True)
        for copy in range(40):
            for image in sorted(folder.iterdir()):
                shutil.copyfile(image, data / folder.name / f"{copy}-{image.name}")
    process = start(tmp_path, f"data.root={data}", *ARGS)
    output = tmp_path / "output.txt"
    wait_for(lambda: "Seed set to" in output.read_text(), process, tmp_path, "the start of the run")
    process.send_signal(signal.SIGTERM)  # the scan of 3200 images takes a second or more
    process.wait(timeout=300)
    text = output.read_text()
    assert process.returncode == 143, text[-3000:]
    assert "stopped by SIGTERM (preemption or a scheduler's time limit) before training started" in text
    assert "nothing was trained" in text and "Traceback" not in text
    assert "Received SIGTERM" in (tmp_path / "run" / "train.log").read_text()
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))
