"""The commands in one style: train, eval, predict, export and serve read ``key=value`` settings,
answer ``--help`` before torch loads, take the checkpoint as ``ckpt_path=``, exist as console
scripts, and turn a command line in an older form into one line with the new form. (What the
commands compute is tested in test_cli.py, test_eval.py, test_predict_cli.py, test_export.py.)"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from helpers import REPO
from transfer_learning.cli import export as export_cli
from transfer_learning.cli import predict as predict_cli
from transfer_learning.cli import serve as serve_cli
from transfer_learning.cli.hydra_entry import older_style
from transfer_learning.cli.options import split_list

BIN = Path(sys.executable).parent
# (how it is started, what its --help starts with)
FORMS = {
    "python train.py": ([str(REPO / "train.py")], "train is powered by Hydra"),
    "python eval.py": ([str(REPO / "eval.py")], "eval is powered by Hydra"),
    "python -m ...results.predict": (["-m", "transfer_learning.results.predict"], "usage: tl-predict"),
    "python scripts/export.py": ([str(REPO / "scripts" / "export.py")], "usage: tl-export"),
    "tl-train": ([str(BIN / "tl-train")], "train is powered by Hydra"),
    "tl-eval": ([str(BIN / "tl-eval")], "eval is powered by Hydra"),
    "tl-predict": ([str(BIN / "tl-predict")], "usage: tl-predict"),
    "tl-export": ([str(BIN / "tl-export")], "usage: tl-export"),
}
# Run as `python <form> --help`, then say whether torch (or Lightning) was loaded.
PROBE = """
import atexit, runpy, sys
atexit.register(lambda: print("\\nloaded:", sorted({"torch", "lightning"} & set(sys.modules))))
args = sys.argv[1:]
if args[0] == "-m":
    sys.argv = [args[1], *args[2:]]
    runpy.run_module(args[1], run_name="__main__", alter_sys=True)
else:
    sys.argv = args
    runpy.run_path(args[0], run_name="__main__")
"""


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("form", FORMS)
def test_help_answers_before_torch_loads(form: str, tmp_path: Path) -> None:
    start, head = FORMS[form]
    if not Path(start[-1]).exists() and start[0] != "-m":
        pytest.fail(f"{start[-1]} is missing: pyproject.toml's [project.scripts]; `pip install -e .`")
    result = run([*start, "--help"], tmp_path)  # from another folder: conf/ is found all the same
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(head), result.stdout[:500]
    assert "ckpt_path" in result.stdout
    assert result.stdout.rstrip().endswith("loaded: []"), result.stdout[-300:]


def test_the_console_scripts_are_declared() -> None:
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {
        "tl-train": "transfer_learning.cli.train:main",
        "tl-eval": "transfer_learning.cli.eval:main",
        "tl-predict": "transfer_learning.cli.predict:main",
        "tl-export": "transfer_learning.cli.export:main",
        "tl-serve": "transfer_learning.cli.serve:main",
    }


# -- an older form: one line, the new form ----------------------------------------------


@pytest.mark.parametrize(
    ("form", "args", "rewritten"),
    [
        ("python eval.py", ["best.ckpt"], "ckpt_path=best.ckpt"),
        ("tl-eval", ["--ckpt_path", "best.ckpt", "--split=all", "--tta", "flip"],
         "ckpt_path=best.ckpt split=all tta=flip"),
        ("python train.py", ["--strategy", "finetune", "--compile"], "strategy=finetune compile=true"),
        ("tl-predict", ["best.ckpt", "a.jpg", "b c.jpg", "--top-k", "3", "-o", "p.csv"],
         "ckpt_path=best.ckpt 'images=[a.jpg,'\"'\"'b c.jpg'\"'\"']' output=p.csv top_k=3"),
        ("python -m ...results.predict", ["best.ckpt", "photos", "--device=cpu"],
         "ckpt_path=best.ckpt images=photos device=cpu"),
        ("python scripts/export.py", ["best.ckpt", "--format", "torchscript"],
         "ckpt_path=best.ckpt format=torchscript"),
    ],
)  # fmt: skip
def test_an_older_form_gets_the_new_one(form: str, args: list[str], rewritten: str, tmp_path: Path) -> None:
    start, _ = FORMS[form]
    result = run([*start, *args], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"error: {args[0]!r} is not key=value"), message
    assert message.endswith(" " + rewritten), message
    assert "loaded: []" in result.stdout  # answered before torch loads
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_rewritten_command_runs_as_written() -> None:
    """What the message says to type is read back as the old command meant it."""
    message = predict_cli.COMMAND.rewrite(["m.ckpt", "x y.jpg", "*.png", "--top-k", "2"])
    assert message is not None
    args = predict_cli.parse_args(shlex.split(message)[1:])
    assert (args.checkpoint, args.paths, args.top_k) == (Path("m.ckpt"), ["x y.jpg", "*.png"], 2)


@pytest.mark.parametrize(
    "argv",
    [
        ["train.py", "-m", "strategy=feature_extract,finetune", "hydra/launcher=submitit_local"],
        ["train.py", "+trainer.limit_train_batches=2", "++x.y=1", "~logger", "--cfg", "job", "--resolve"],
        ["eval.py", "ckpt_path=a b.ckpt", "--info", "defaults", "-cn", "eval", "--config-dir=/x"],
        ["train.py", "hparams_search=optuna", "hydra.sweeper.params.lr=interval(1e-4,1e-2)", "--info"],
        ["train.py", "-sc", "install=bash"],
        [
            "train.py",
            "hydra.run.dir=/runs/x",
            "hydra.job.name=train_ddp_process_1",
            "hydra.output_subdir=null",
        ],
    ],
)
def test_hydra_command_lines_pass(argv: list[str]) -> None:
    assert older_style(argv, ("ckpt_path",)) is None


def test_an_unreadable_older_form_points_to_help() -> None:
    assert older_style(["train.py", "best.ckpt"]) == (
        "'best.ckpt' is not key=value: python train.py takes settings as key=value (Hydra overrides); "
        "see --help."
    )


# -- predict and export: values, mistakes, help -----------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["format=onnx"], "ckpt_path=... is required"),
        (["ckpt_path=x.ckpt", "format=tflite"], "format=tflite: format must be one of onnx, torchscript."),
        (["ckpt_path=x.ckpt", "batch=3"], "unknown option 'batch'"),
        (["ckpt_path=x.ckpt", "atl=0.1"], "unknown option 'atl': did you mean atol?"),
        (["ckpt_path=x.ckpt", "max_images=1"], "max_images=1: max_images must be an integer >= 2."),
        (["ckpt_path=x.ckpt", "atol=abc"], "atol=abc: atol must be a number >= 0."),
        (["ckpt_path=x.ckpt", "atol=nan"], "atol=nan: atol must be a number >= 0."),
        (["ckpt_path=x.ckpt", "images=a.jpg,b.jpg"], "for several values write images=[a.jpg,b.jpg]"),
        (["ckpt_path=x.ckpt", "format=[onnx,torchscript]"], "format takes one value, not a list."),
        (["x.ckpt", "format=onnx"], "write: tl-export ckpt_path=x.ckpt format=onnx"),
    ],
)
def test_export_mistakes(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        export_cli.main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["images=a.jpg"], "ckpt_path=... is required"),
        (["ckpt_path=m.ckpt"], "images=... is required"),
        (["ckpt_path=m.ckpt", "images=[]"], "images=... is required"),
        (["ckpt_path=m.ckpt", "images=a.jpg", "output=preds.txt"],
         "output=preds.txt: output must be a file name ending in .csv or .json."),
        (["ckpt_path=m.ckpt", "images=a.jpg", "top_k=0"], "top_k=0: top_k must be an integer >= 1."),
        (["ckpt_path=m.ckpt", "images=a.jpg", "threshold=1.5"], "threshold must be a number in [0, 1]."),
        (["ckpt_path=m.ckpt", "images=a.jpg", "topk=3"], "unknown option 'topk': did you mean top_k?"),
        (["ckpt_path=m.ckpt", "images=a.jpg", "batch-size=3"], "did you mean batch_size?"),
    ],
)  # fmt: skip
def test_predict_mistakes(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        predict_cli.main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_predict_settings(tmp_path: Path) -> None:
    args = predict_cli.parse_args([f"ckpt_path={tmp_path}/m.ckpt", f"images=[{tmp_path},'b c.jpg',x/[ab]*]",
                                   "output=~/p.JSON", "top_k=3", "batch_size=4", "device=cpu",
                                   "threshold=null", "num_workers=0", "explain=~/gradcam"])  # fmt: skip
    paths = [str(tmp_path), "b c.jpg", "x/[ab]*"]
    assert vars(args) == {"checkpoint": tmp_path / "m.ckpt", "paths": paths, "output": Path.home() / "p.JSON",
                          "top_k": 3, "batch_size": 4, "device": "cpu", "threshold": None,
                          "num_workers": 0, "explain": Path.home() / "gradcam"}  # fmt: skip
    defaults = predict_cli.parse_args(["ckpt_path=m.ckpt", "images=photos"])
    assert (defaults.paths, defaults.output, defaults.top_k, defaults.batch_size) == (["photos"], None, 1, 32)
    assert (defaults.device, defaults.threshold, defaults.num_workers, defaults.explain) == (
        "auto",
        None,
        None,
        None,
    )


def test_export_settings(tmp_path: Path) -> None:
    args = export_cli.parse_args([f"ckpt_path={tmp_path}/m.ckpt", "format=TorchScript",
                                  f"images=[{tmp_path},'b.jpg']", "output=~/out/m.pt", "max_images=3",
                                  "atol=1e-4"])  # fmt: skip
    assert args == export_cli.ExportArgs(tmp_path / "m.ckpt", "torchscript", Path.home() / "out" / "m.pt",
                                         (str(tmp_path), "b.jpg"), 3, 1e-4)  # fmt: skip
    assert export_cli.parse_args(["ckpt_path=m.ckpt", "images=photos"]).images == ("photos",)
    assert export_cli.parse_args(["ckpt_path=m.ckpt"]) == export_cli.ExportArgs(Path("m.ckpt"))
    assert export_cli.parse_args(["ckpt_path=m.ckpt"]).output_path == Path("m.onnx")
    assert export_cli.parse_args(["ckpt_path=m.ckpt", "format=torchscript"]).output_path == Path(
        "m.torchscript.pt"
    )


@pytest.mark.parametrize("module", [predict_cli, export_cli])
def test_help_lists_every_setting_with_its_default(module: ModuleType) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module.main(["--help"])
    text = out.getvalue()
    command = module.COMMAND
    required = " ".join(f"{o.name}={o.kind.metavar}" for o in command.options if o.required)
    assert text.startswith(f"usage: {command.prog} {required} [key=value ...]")
    for option in command.options:
        assert re.search(rf"\n  {option.name}={re.escape(option.kind.metavar)}\b", text), option.name
        assert option.default_text() in " ".join(text.split()), option.name
    assert "Exit status" in text


def test_lists() -> None:
    assert split_list("[a,'b,c',\"d e\",x/[ab]*.jpg]") == ["a", "b,c", "d e", "x/[ab]*.jpg"]
    assert split_list("[]") == [] and split_list("a,b") is None


# -- the README and its guides in docs/ show the commands in this style --------------------


def readme_command_lines() -> list[str]:
    """The eval, predict, export and serve lines of the code blocks of README.md and docs/*.md
    (tl-serve's is in docs/serving.md)."""
    lines, in_block = [], False
    text = "\n".join(page.read_text() for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    for line in text.splitlines():
        if line.startswith("```"):
            in_block = not in_block
        elif in_block:
            line = line.removeprefix("$ ")
            if re.match(
                r"(python (eval\.py|scripts/export\.py|-m transfer_learning\.results\.predict)|tl-)", line
            ):
                lines.append(re.sub(r"\s+#.*$", "", line))
    return lines


def test_every_readme_command_is_in_the_key_value_form() -> None:
    lines = readme_command_lines()
    for needed in ("python eval.py", "tl-predict", "python -m transfer_learning.results.predict",
                   "python scripts/export.py", "tl-serve"):  # fmt: skip
        assert any(line.startswith(needed) for line in lines), f"no {needed} line in README.md or docs/*.md"
    for line in lines:
        words = shlex.split(line.replace("$HOME", "/home/u"))
        start = 1 if words[0] != "python" else 3 if words[1] == "-m" else 2  # the settings
        words = words[start:]
        if "eval" in line:
            assert older_style(["eval.py", *words], ("ckpt_path",)) is None, line
        elif "export" in line:
            export_cli.parse_args(words)
        elif "serve" in line:
            serve_cli.parse_args(words)
        else:
            predict_cli.parse_args(words)
