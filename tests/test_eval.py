"""eval.py: exact metrics of a checkpoint on one device, on the run's own test split or on a
held-out folder, matching what the training run reported."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from forkrun import run_python

from helpers import REPO, check_run, confusion_counts, run_cli
from transfer_learning.data.demo import generate_shapes


def eval_cli(cwd: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    env.pop("PROJECT_ROOT", None)
    return run_python(
        [REPO / "eval.py", f"hydra.run.dir={cwd}/eval", "data.num_workers=0", *overrides], cwd=cwd, env=env
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    """A run trained on root/train, validated on root/val, tested on the held-out root/test."""
    base = tmp_path_factory.mktemp("heldout")
    root = base / "data"
    for split, count, seed in (("train", 12, 0), ("val", 5, 1), ("test", 7, 2)):
        generate_shapes(root / split, images_per_class=count, image_size=64, seed=seed)
    result = run_cli(base, "data=imagefolder", f"data.root={root}", "input.image_size=48",
                     "trainer.max_epochs=2", "logger=csv", "worst_samples=0",
                     "data.batch_size=8")  # fmt: skip
    summary = check_run(base, result, "feature_extract")
    return root, summary, base


@pytest.mark.slow
def test_eval_on_the_held_out_folder_matches_the_training_runs_test_metrics(held_out, tmp_path):
    root, summary, base = held_out
    checkpoint = summary["best checkpoint"]
    own = eval_cli(tmp_path, f"ckpt_path={checkpoint}")  # the run's own test split, from run_config.yaml
    assert own.returncode == 0, own.stderr[-3000:]
    folder = tmp_path / "folder"
    folder.mkdir()
    alone = eval_cli(folder, f"ckpt_path={checkpoint}", f"data.root={root / 'test'}", "split=all")
    assert alone.returncode == 0, alone.stderr[-3000:]
    for where in (tmp_path, folder):
        result = json.loads((where / "eval" / "eval.json").read_text())
        assert result["images"] == 35
        assert result["accuracy"] == pytest.approx(summary["test/acc"], abs=1e-6)
        assert result["macro_f1"] == pytest.approx(summary["test/f1"], abs=1e-6)
        assert result["confusion_matrix"] == confusion_counts(base / "run")
        rows = read_csv(where / "eval" / "predictions.csv")  # the accuracy, recounted from the rows
        assert len(rows) == 35 and sum(r["true"] == r["predicted"] for r in rows) / 35 == pytest.approx(
            result["accuracy"]
        )
        names = result["class_names"]
        assert all(abs(sum(float(r[n]) for n in names) - 1) < 1e-5 for r in rows)
        per_class = {r["class"]: r for r in result["per_class"]}
        assert [per_class[n]["support"] for n in names] == [7] * 5
    assert "Evaluation of" in own.stdout and "macro F1" in own.stdout

    # The confidence threshold predict reads: 5 % of the correctly classified images fall below it.
    note = json.loads(Path(checkpoint).with_name(Path(checkpoint).stem + ".threshold.json").read_text())
    rows = read_csv(folder / "eval" / "predictions.csv")
    right = torch.tensor(
        [float(r["confidence"]) for r in rows if r["true"] == r["predicted"]], dtype=torch.float64
    )
    assert note["max_softmax_threshold"] == pytest.approx(float(torch.quantile(right, 0.05)))


@pytest.mark.slow
def test_flip_tta_averages_each_image_with_its_mirror(held_out, tmp_path):
    from transfer_learning.data.images import load_rgb
    from transfer_learning.data.transforms import build_transforms
    from transfer_learning.model.module import TransferLearningModule
    from transfer_learning.run.checkpoints import safe_load

    root, summary, _ = held_out
    result = eval_cli(tmp_path, f"ckpt_path={summary['best checkpoint']}", f"data.root={root / 'test'}",
                      "split=all", "tta=flip")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(tmp_path / "eval" / "predictions.csv")
    module = TransferLearningModule.load_for_inference(summary["best checkpoint"])
    t = safe_load(summary["best checkpoint"])["calibration"]["temperature"]  # calibrated probabilities
    transform = build_transforms(module.preprocessing, train=False, augment={})
    for row in rows[:4]:
        x = transform(load_rgb(row["file"]))[None]
        with torch.inference_mode():
            expected = ((module(x) / t).softmax(-1) + (module(x.flip(-1)) / t).softmax(-1)) / 2
        got = torch.tensor([float(row[n]) for n in module.class_names])
        assert torch.allclose(got, expected[0], atol=1e-5)
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["tta"] == "flip"


@pytest.mark.slow
def test_eval_after_a_two_process_ddp_run_gives_the_one_device_numbers(tmp_path, shapes_dir):
    """The DDP run's own test numbers (distributed, every sample once) equal eval's plain loop."""
    result = run_cli(tmp_path, "trainer=ddp_cpu", f"data.root={shapes_dir}", "input.image_size=48",
                     "trainer.max_epochs=1", "logger=csv", "worst_samples=0",
                     "strategy=finetune")  # fmt: skip
    summary = check_run(tmp_path, result, "finetune")
    evaluated = eval_cli(tmp_path, f"ckpt_path={summary['best checkpoint']}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    numbers = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert numbers["images"] == int(summary["images train/val/test"].split("/")[2])
    assert numbers["accuracy"] == pytest.approx(summary["test/acc"], abs=1e-6)
    assert numbers["macro_f1"] == pytest.approx(summary["test/f1"], abs=1e-6)
    assert numbers["confusion_matrix"] == confusion_counts(tmp_path / "run")


@pytest.mark.slow
def test_eval_errors_name_the_setting_and_the_fix(held_out, tmp_path):
    _, summary, _ = held_out
    missing = eval_cli(tmp_path)
    said = missing.stdout + missing.stderr
    assert missing.returncode == 2 and "ckpt_path is required" in said and "Traceback" not in said
    classes = ("circle", "hexagon")
    other = generate_shapes(tmp_path / "other", images_per_class=3, image_size=48, classes=classes)
    unknown = eval_cli(tmp_path, f"ckpt_path={summary['best checkpoint']}", f"data.root={other}", "split=all")
    said = unknown.stdout + unknown.stderr
    assert unknown.returncode == 2 and "'hexagon'" in said and "Traceback" not in said
    bad = eval_cli(tmp_path, f"ckpt_path={summary['best checkpoint']}", "tta=rotate")
    assert bad.returncode == 2 and "tta=rotate: none or flip" in bad.stdout + bad.stderr


def test_input_settings_reach_eval_whatever_the_data_group():
    """input.* is one of eval's settings with any data group (it was "not a group of settings"
    with data=imagefolder); a key the input group does not have keeps its usual message."""
    from transfer_learning.cli.checks import check_command

    for data in ([], ["data=imagefolder", "data.root=x"], ["data=csv", "data.file=x.csv"]):
        command = ["eval.py", "ckpt_path=x.ckpt", *data]
        repeated = ["input.image_size=96", "input.image_size_strict=true"]
        assert check_command("eval", [*command, *repeated]) is None
        assert check_command("eval", [*command, "input.imagesize=96"]) == (
            "input.imagesize is not a setting (did you mean input.image_size=96?)."
        )


METRICS = ("images", "accuracy", "macro_f1", "per_class", "confusion_matrix", "max_softmax_threshold")


@pytest.mark.slow
def test_input_settings_the_checkpoint_was_trained_with_change_nothing(held_out, tmp_path):
    """The training command's input.image_size=48 (and input.image_size_strict=true, its default),
    repeated on eval's command line, is the checkpoint's own: the same numbers as without it, on
    the run's own test split and with data=imagefolder on the same held-out folder."""
    root, summary, _ = held_out
    checkpoint = summary["best checkpoint"]
    commands = {
        "plain": [],
        "repeated": ["input.image_size=48", "input.image_size_strict=true"],
        "group": ["data=imagefolder", f"data.root={root / 'test'}", "split=all", "input.image_size=48"],
    }
    results = {}
    for name, settings in commands.items():
        cwd = tmp_path / name
        cwd.mkdir()
        result = eval_cli(cwd, f"ckpt_path={checkpoint}", *settings)
        assert result.returncode == 0, result.stderr[-3000:]
        results[name] = json.loads((cwd / "eval" / "eval.json").read_text())
        given = " ".join(s for s in settings if s.startswith("input."))
        said = (result.stdout + result.stderr).splitlines()
        info = [line for line in said if "the checkpoint's own" in line]
        assert info == ([f"{given}: the checkpoint's own; eval takes the image size from it (48 px)."]
                        if given else [])  # fmt: skip
    plain = results["plain"]
    # (the threshold is a float32 confidence: two processes may differ in its last digits, as two
    # runs of the same command do under load)
    exact = [k for k in plain if k not in ("files", "max_softmax_threshold")]
    assert {k: results["repeated"][k] for k in exact} == {k: plain[k] for k in exact}
    assert results["repeated"]["max_softmax_threshold"] == pytest.approx(
        plain["max_softmax_threshold"], abs=1e-5
    )
    exact = [k for k in METRICS if k != "max_softmax_threshold"]
    assert {k: results["group"][k] for k in exact} == {k: plain[k] for k in exact}
    assert results["group"]["max_softmax_threshold"] == pytest.approx(
        plain["max_softmax_threshold"], abs=1e-5
    )
    assert read_csv(tmp_path / "repeated" / "eval" / "predictions.csv") == read_csv(
        tmp_path / "plain" / "eval" / "predictions.csv"
    )


@pytest.mark.slow
def test_input_settings_that_contradict_the_checkpoint_stop_eval_before_it_writes(held_out, tmp_path):
    """input.image_size=96 for a checkpoint trained at 48 px: exit 2, one line that says the size
    comes from the checkpoint, names its value and the way on; an input.* key that does not
    exist: the unknown-setting message. Neither writes into the checkpoint's folder (no
    threshold file) or leaves an eval folder."""
    root, summary, _ = held_out
    checkpoint = Path(summary["best checkpoint"])
    folder = checkpoint.parent
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}
    held_out_folder = ["data=imagefolder", f"data.root={root / 'test'}", "split=all"]
    for n, data in enumerate(([], held_out_folder)):
        cwd = tmp_path / f"contradicts{n}"
        cwd.mkdir()
        result = eval_cli(cwd, f"ckpt_path={checkpoint}", *data, "input.image_size=96")
        said = result.stdout + result.stderr
        assert result.returncode == 2 and "Traceback" not in said, said[-3000:]
        lines = [line for line in said.splitlines() if "input.image_size" in line]
        assert lines == [
            f"Error: input.image_size=96 contradicts the checkpoint {checkpoint.name}: eval takes the "
            "image size from the checkpoint, trained with input.image_size=48 (48 px). Drop "
            "input.image_size=96 from the command line."
        ], said[-3000:]
        assert not (cwd / "eval").exists()
    cwd = tmp_path / "unknown"
    cwd.mkdir()
    unknown = eval_cli(cwd, f"ckpt_path={checkpoint}", "input.imagesize=48")
    said = unknown.stdout + unknown.stderr
    assert unknown.returncode == 2 and "Traceback" not in said
    assert said.strip() == "Error: input.imagesize is not a setting (did you mean input.image_size=48?)."
    assert not (cwd / "eval").exists()
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()} == before
