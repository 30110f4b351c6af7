"""`ckpt_path=last` continues a run as it was started: its own settings come back from its run
folder (as data: never a setting that names code), settings given again win, and a checkpoint
that cannot go on is refused with the command that would. Ctrl-C saves `last.ckpt`, says how to
resume and exits 130. The end-to-end test is the sequence of docs/when-things-go-wrong.md (README's
"When things go wrong"), typed as a user types it."""

from __future__ import annotations

import glob
import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from forkrun import Started, start_python

from helpers import REPO
from transfer_learning.errors import RunFinished
from transfer_learning.run.checkpoints import CheckpointError, check_resumable
from transfer_learning.run.resume import RUN_SETTINGS, restore_settings, save_run_settings

# -- restoring a run's settings ------------------------------------------------------------


def fake_run(root: Path, settings: list[str], name: str = "2026-01-01_00-00-00_000000") -> Path:
    """A run folder as train.py leaves it: .hydra/, checkpoints/last.ckpt, the saved settings."""
    run = root / "logs" / "train" / "runs" / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    save_run_settings(run, settings)
    return run


def test_ckpt_path_last_brings_back_the_runs_own_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    run = fake_run(tmp_path, ["strategy=finetune", "trainer.max_epochs=3", "ckpt_path=/old.ckpt"])
    argv = restore_settings(["train.py", "ckpt_path=last"])
    assert argv == [
        "train.py",
        "strategy=finetune",
        "trainer.max_epochs=3",
        f"ckpt_path={run}/checkpoints/last.ckpt",
    ]
    assert f"Resuming {run} from last.ckpt with the settings it was started with" in capsys.readouterr().err


def test_settings_given_again_win_and_a_new_group_drops_the_old_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    fake_run(
        tmp_path, ["strategy=gradual_unfreeze", "strategy.unfreeze_epoch=2", "trainer.max_epochs=3", "seed=1"]
    )
    argv = restore_settings(["train.py", "trainer.max_epochs=9", "strategy=finetune", "ckpt_path=last"])
    assert argv[1:3] == ["seed=1", "trainer.max_epochs=9"]  # restored first, then the command line
    assert "strategy.unfreeze_epoch=2" not in argv and "strategy=gradual_unfreeze" not in argv
    assert argv[3] == "strategy=finetune"


def test_a_saved_setting_that_names_code_is_never_restored(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    fake_run(tmp_path, ["+callbacks.x._target_=os.system", "+callbacks.x.command=touch pwned", "seed=3"])
    argv = restore_settings(["train.py", "ckpt_path=last"])
    assert [a for a in argv if "callbacks" in a] == []
    assert "seed=3" in argv
    err = capsys.readouterr().err
    assert "not restoring '+callbacks.x._target_=os.system' from" in err
    assert "not restoring '+callbacks.x.command=touch pwned' from" in err


def test_a_hand_edited_settings_file_is_refused_with_its_name(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    run = fake_run(tmp_path, [])
    (run / RUN_SETTINGS).write_text(yaml.safe_dump({"not": "a list"}))
    with pytest.raises(SystemExit) as stop:
        restore_settings(["train.py", "ckpt_path=last"])
    assert stop.value.code == 2 and str(run / RUN_SETTINGS) in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("last", "no run under"),
        ("missing.ckpt", "ckpt_path=missing.ckpt: no such file"),
        ("photos", "ckpt_path=photos is a folder"),
    ],
)
def test_nothing_to_resume_is_one_line_before_any_folder_is_made(tmp_path, monkeypatch, capsys, value, says):
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    with pytest.raises(SystemExit) as stop:
        restore_settings(["train.py", f"ckpt_path={value}"])
    assert stop.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


def test_a_multirun_and_a_command_without_ckpt_path_are_left_alone():
    assert restore_settings(["train.py", "seed=1"]) == ["train.py", "seed=1"]
    assert restore_settings(["train.py", "-m", "ckpt_path=last"]) == ["train.py", "-m", "ckpt_path=last"]


# -- what can go on ------------------------------------------------------------------------

FINETUNE = {"model": {"_target_": "x.efficientnet_lite0"}, "class_names": ["a", "b"],
            "strategy": {"_target_": "transfer_learning.model.strategies.FineTuning"}}  # fmt: skip


def checkpoint(epochs: int, groups: int = 2, strategy: str = "FineTuning", stopped: int = 0) -> dict:
    return {
        "hyper_parameters": {
            **FINETUNE,
            "strategy": {"_target_": f"transfer_learning.model.strategies.{strategy}"},
        },
        "optimizer_states": [{"param_groups": [{}] * groups}],
        "loops": {"fit_loop": {"epoch_progress": {"current": {"processed": epochs}}}},
        "callbacks": {"EarlyStopping{'monitor': 'val/acc'}": {"stopped_epoch": stopped}},
    }


def test_another_strategy_is_refused_with_the_command_that_continues(tmp_path):
    with pytest.raises(CheckpointError, match=r"FeatureExtraction strategy \(1 param groups\), this run uses "
                       r"FineTuning \(2\).*`python train.py ckpt_path=c.ckpt`"):  # fmt: skip
        check_resumable(checkpoint(1, 1, "FeatureExtraction"), FINETUNE, 2, 5, "c.ckpt", None)
    with pytest.raises(CheckpointError, match="param groups"):
        check_resumable(checkpoint(1, 3), FINETUNE, 2, 5, "c.ckpt", None)


def test_an_epoch_budget_below_the_epochs_done_is_refused(tmp_path):
    with pytest.raises(
        CheckpointError, match=r"trained 30 epochs, more than trainer.max_epochs=8.*max_epochs=40"
    ):
        check_resumable(checkpoint(30), FINETUNE, 2, 8, "c.ckpt", None)


def test_a_finished_run_is_reported_finished_and_an_unfinished_one_goes_on(tmp_path):
    assert check_resumable(checkpoint(2), FINETUNE, 2, 3, "c.ckpt", tmp_path) == 2
    assert check_resumable(checkpoint(3), FINETUNE, 2, 3, "c.ckpt", tmp_path) == 3  # no results yet: test
    (tmp_path / "summary.json").write_text(json.dumps({"best checkpoint": "best.ckpt"}))
    with pytest.raises(RunFinished, match=r"already finished \(3 of 3 epochs\).*eval.py ckpt_path=best.ckpt"):
        check_resumable(checkpoint(3), FINETUNE, 2, 3, "c.ckpt", tmp_path)
    with pytest.raises(RunFinished, match="early stopping"):
        check_resumable(checkpoint(2, stopped=1), FINETUNE, 2, 3, "c.ckpt", tmp_path)


# -- docs/when-things-go-wrong.md's sequence, end to end -----------------------------------


def train(cwd: Path, *overrides: str, terminal: bool = False) -> Started:
    """`python train.py overrides...` in ``cwd``, not waited for; its output in cwd/output.txt.
    ``terminal``: in a fresh interpreter leading a process group of its own, as a shell starts
    it, so that Ctrl-C can reach it and its loader workers together."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    env.pop("PROJECT_ROOT", None)
    args = [REPO / "train.py", *overrides]
    return start_python(args, cwd, env, new_session=terminal, output=cwd / "output.txt", fresh=terminal)


@pytest.mark.slow
def test_readme_resume_after_ctrl_c_of_a_non_default_run(tmp_path):
    """`python train.py strategy=finetune trainer.max_epochs=3` (shrunk: small images, a small
    demo set), Ctrl-C to the whole terminal group once epoch 0 is saved: exit 130, last.ckpt,
    the resume command. Then `python train.py ckpt_path=last` with no other argument finishes
    it as fine-tuning in the same folder; again: "already finished", results untouched; with
    another strategy: refused, no new W&B folder."""
    small = ["input.image_size=48", "data.generate.images_per_class=12", "data.num_workers=2"]
    first = train(tmp_path, "strategy=finetune", "trainer.max_epochs=3", *small, terminal=True)
    deadline = time.monotonic() + 300
    while not glob.glob(str(tmp_path / "logs/train/runs/*/checkpoints/last.ckpt")):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    output = first.communicate(timeout=300)[0]
    assert first.returncode == 130, output[-3000:]
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    last = run / "checkpoints" / "last.ckpt"
    assert f"stopped by Ctrl-C (SIGINT) during training; saved a resumable checkpoint: {last}" in output
    assert f"Resume with: python train.py ckpt_path={last}" in output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert not (run / "summary.json").exists()

    resumed = train(tmp_path, "ckpt_path=last")
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert (
        f"Resuming {run} from last.ckpt with the settings it was started with: strategy=finetune " in output
    )
    assert "Continuing" in output and "of 3 epochs done" in output
    assert list((tmp_path / "logs" / "train" / "runs").iterdir()) == [run]  # the same folder
    summary = json.loads((run / "summary.json").read_text())
    assert summary["strategy"] == "finetune" and summary["epochs run"] == 3

    before = (run / "summary.json").read_bytes(), sorted((run / "wandb").iterdir())
    again = train(tmp_path, "ckpt_path=last")
    output = again.communicate(timeout=600)[0]
    assert again.returncode == 0, output[-3000:]
    assert "has already finished (3 of 3 epochs)" in output and "Run summary" not in output
    other = train(tmp_path, "ckpt_path=last", "strategy=feature_extract")
    output = other.communicate(timeout=600)[0]
    assert other.returncode == 2, output[-3000:]
    assert "FineTuning strategy (2 param groups), this run uses FeatureExtraction (1)" in output
    assert f"`python train.py ckpt_path={last}`" in output and "Traceback" not in output
    assert ((run / "summary.json").read_bytes(), sorted((run / "wandb").iterdir())) == before
