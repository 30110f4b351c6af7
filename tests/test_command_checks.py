"""The mistakes a new user makes on the command line end in one line that names the fix, fast,
without a traceback and without leaving a run folder behind."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from forkrun import run_python

from helpers import REPO
from transfer_learning.cli.checks import check_command
from transfer_learning.cli.predict import COMMAND as PREDICT_COMMAND
from transfer_learning.run.config import expand_overrides
from transfer_learning.run.sweeps import remove_unused_run_folder


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["trainer.max_epoch=3"], "trainer.max_epoch is not a setting (did you mean trainer.max_epochs=3?)"),
        (["data.rooot=/x"], "did you mean data.root=/x?"),
        (
            ["+trainer.max_epoch=3"],
            "did you mean trainer.max_epochs=3? (To add it anyway: ++trainer.max_epoch=3.)",
        ),
        (["strategy.head_lr=abc"], "strategy.head_lr=abc is not a number (its default is 0.1)"),
        (["strategy=finetune", "strategy.backbone_lr=fast"], "strategy.backbone_lr=fast is not a number"),
        (["data.batch_size=x"], "data.batch_size=x is not a number"),
        (["channels_last=maybe"], "channels_last=maybe is not true or false"),
        (["strategy=finetun"], "did you mean strategy=finetune? options: feature_extract, finetune"),
    ],
)
def test_typos_and_wrong_types_get_the_setting_they_meant(args, says):
    assert says in (check_command("train", ["train.py", *args]) or "")


def test_good_settings_and_new_keys_unlike_old_ones_pass():
    assert (
        check_command(
            "train", ["train.py", "strategy=finetune", "strategy.head_lr=3e-3", "trainer.max_epochs=3"]
        )
        is None
    )
    assert check_command("train", ["train.py", "+trainer.gradient_clip_val=1.0", "tags=[a,b]"]) is None
    assert check_command("train", ["train.py", "++trainer.max_epoch=3"]) is None  # asked for on purpose
    assert check_command("train", ["train.py", "-m", "strategy.head_lr=1e-3,abc"]) is None  # Hydra's per job
    assert check_command("train", ["train.py", "--help"]) is None
    # Configs from another folder (README "Extending the template"): their options are Hydra's to check.
    assert "not an option of strategy" in (
        check_command("train", ["train.py", "strategy=centroid_head"]) or ""
    )
    extra = ["train.py", "hydra.searchpath=[file:///my_conf]", "strategy=centroid_head"]
    assert check_command("train", extra) is None


def test_eval_without_a_checkpoint_and_slurm_without_slurm(monkeypatch):
    assert "ckpt_path is required: python eval.py ckpt_path=" in check_command("eval", ["eval.py"])
    monkeypatch.setenv("PATH", "/nonexistent")
    problem = check_command("train", ["train.py", "-m", "hydra/launcher=submitit_slurm", "seed=1,2"])
    assert (
        "sbatch, which is not on this machine's PATH" in problem
        and "hydra/launcher=submitit_local" in problem
    )


def test_letters_beyond_ascii_are_quoted_for_hydra(tmp_path):
    folder = tmp_path / "ünïcødé 鳥"
    assert expand_overrides([f"data.root={folder}"]) == [f'data.root="{folder}"']
    assert expand_overrides(["data.root=/plain/path", "tags=[é,b]"]) == [
        "data.root=/plain/path",
        "tags=[é,b]",
    ]


def run(tmp_path: Path, script: str, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PROJECT_ROOT", None)
    started = time.monotonic()
    result = run_python([REPO / script, *args], cwd=tmp_path, env=env)
    return result, time.monotonic() - started


@pytest.mark.parametrize(
    ("script", "args", "says"),
    [
        ("train.py", ["trainer.max_epoch=3"], "did you mean trainer.max_epochs=3?"),
        ("eval.py", [], "ckpt_path is required"),
        ("train.py", ["ckpt_path=last"], "no run under"),
    ],
)
def test_command_line_mistakes_stop_before_a_run_folder_is_made(tmp_path, script, args, says):
    result, _ = run(tmp_path, script, *args)
    assert result.returncode == 2 and says in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "logs").exists()


def test_a_non_ascii_path_reaches_the_run_unquoted(tmp_path):
    """`data.root=.../ünïcødé 鳥` as typed: the run's own message about that folder, with its
    name intact, not Hydra's lexer error; and no run folder left by the mistake."""
    missing = tmp_path / "ünïcødé 鳥"
    result, _ = run(tmp_path, "train.py", "data=imagefolder", f"data.root={missing}", "logger=csv")
    assert result.returncode == 2
    assert f"data.root={missing} does not exist" in result.stdout + result.stderr
    assert "LexerNoViableAltException" not in result.stderr and "Traceback" not in result.stderr
    assert not list((tmp_path / "logs" / "train" / "runs").iterdir())


def test_a_data_root_typed_under_the_demo_data_says_to_switch_to_imagefolder(tmp_path):
    result, _ = run(tmp_path, "train.py", f"data.root={tmp_path / 'birds'}", "logger=csv")
    assert result.returncode == 2
    assert f"python train.py data=imagefolder data.root={tmp_path / 'birds'}" in result.stdout
    assert "or use data=demo" not in result.stdout


def test_only_a_run_folder_with_nothing_but_hydras_records_is_removed(tmp_path):
    empty = tmp_path / "empty"
    (empty / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (empty / ".hydra" / name).write_text("x")
    (empty / "train.log").write_text("Error: ...")
    assert remove_unused_run_folder(empty) and not empty.exists()
    resumed = tmp_path / "resumed"
    (resumed / ".hydra").mkdir(parents=True)
    (resumed / "checkpoints").mkdir()
    (resumed / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    (resumed / "train.log").write_text("")
    assert not remove_unused_run_folder(resumed) and (resumed / "checkpoints" / "last.ckpt").exists()


def test_swapped_predict_arguments_are_read_by_what_they_are(tmp_path):
    (tmp_path / "photos").mkdir()
    ckpt = tmp_path / "best.ckpt"
    ckpt.write_bytes(b"")
    line = PREDICT_COMMAND.rewrite(["photos", str(ckpt)])
    assert line is not None and f"ckpt_path={ckpt}" in line and "images=photos" in line
    env = {**os.environ}
    result = run_python(["-m", "transfer_learning.results.predict", "ckpt_path=photos", f"images={ckpt}"],
                        cwd=tmp_path, env=env, timeout=300)  # fmt: skip
    assert result.returncode == 2
    assert f"ckpt_path and images look swapped; write ckpt_path={ckpt} images=photos" in result.stderr
