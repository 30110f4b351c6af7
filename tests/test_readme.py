"""Every `python train.py ...` line of README.md and of the guides it links in docs/, run as
written from a fresh working directory; and every relative link of those pages resolves.

Only the work is shrunk (one short epoch, small batches and images, a small demo data set made
up front); no path is overridden, so the outputs land where a user's would. What a user would
have already is provided the way a user would have it: $HOME/data/birds for the "your own
images" lines, torchvision weights in $TORCH_HOME's cache, and the CPU for `trainer=gpu` on a
machine without a GPU.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from forkrun import run_python

from helpers import REPO
from transfer_learning.data.demo import generate_multilabel_shapes, generate_shapes
from transfer_learning.model.backbones.torchvision_models import torchvision_cache_file
from transfer_learning.run.config import CONF_DIR

SHRINK = [
    "trainer.max_epochs=1",
    "++trainer.limit_train_batches=2",
    "++trainer.limit_val_batches=2",
    "++trainer.limit_test_batches=2",
    "data.batch_size=8",
    "input.image_size=64",
    "data.num_workers=0",
]


# Commands that need what this machine cannot have: a SLURM cluster.
NEEDS_A_CLUSTER = ("hydra/launcher=submitit_slurm",)

README, DOCS = REPO / "README.md", REPO / "docs"
# The line with which a README section hands on to its page in docs/, the guide.
GUIDE = re.compile(r"The whole guide: \[docs/([\w-]+\.md)\]\(docs/\1\)")


def guides() -> list[Path]:
    """The pages in docs/ that README's sections hand on to, in README's order."""
    return [DOCS / found[1] for found in GUIDE.finditer(README.read_text())]


def readme_and_guide_lines() -> list[str]:
    """README.md's lines, each guide's lines right after the README line that links it: a guide's
    commands come where its section stood in README, so a resume still follows the run it
    continues (README first, then the guides, would put README's resumes after the wrong run)."""
    lines = []
    for line in README.read_text().splitlines():
        lines.append(line)
        if found := GUIDE.search(line):
            lines += (DOCS / found[1]).read_text().splitlines()
    return lines


def readme_commands(runnable_here: bool = True) -> list[str]:
    """`python train.py` commands of the code blocks of README.md and its guides (continuation
    lines joined), without trailing comments."""
    commands, in_block, pending = [], False, ""
    for line in readme_and_guide_lines():
        if line.startswith("```"):
            in_block = not in_block
        elif in_block and (pending or line.startswith("python train.py")):
            pending += re.sub(r"\s+#.*$", "", line).strip()
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            commands.append(" ".join(pending.split()))
            pending = ""
    if runnable_here:
        commands = [c for c in commands if not any(need in c for need in NEEDS_A_CLUSTER)]
    return commands


def shell_words(line: str, cwd: Path, env: dict[str, str]) -> list[str]:
    """The arguments bash makes of ``line`` (its quotes, ``$HOME``, ``~``): what the command
    receives when a user types it. The command itself then runs in a forked child (forkrun)."""
    done = subprocess.run(["bash", "-c", f"printf '%s\\0' {line}"], cwd=cwd, env=env, capture_output=True,
                          text=True, check=True, timeout=60)  # fmt: skip
    return done.stdout.split("\0")[:-1]


def is_multirun(command: str) -> bool:
    return " -m " in f" {command} " or "hparams_search=" in command


def segments() -> list[list[str]]:
    """README's and its guides' commands in groups, each group run in order in one working directory of its
    own (the groups in parallel when pytest has workers). A command is a group of its own,
    except a resume: it continues the newest run under logs/train/runs, so it joins the group
    of the last command that leaves one there, with the commands between them that leave none
    there (a recipe with its own task name, a debug run). Multiruns write to multiruns/ and keep
    their own groups."""
    groups: list[list[str]] = []
    for command in readme_commands():
        if "ckpt_path=" not in command:
            groups.append([command])
            continue
        home = max(
            i for i, g in enumerate(groups)
            if not is_multirun(g[0]) and "experiment=" not in g[0] and "debug=" not in g[0]
        )  # fmt: skip
        for group in [g for g in groups[home + 1 :] if not is_multirun(g[0])]:
            groups[home] += group
            groups.remove(group)
        groups[home].append(command)
    return groups


def jobs(command: str) -> int:
    """How many runs a command starts: the product of comma-separated sweep values, or the
    number of Optuna trials."""
    if "hparams_search=optuna" in command:
        return int(
            re.findall(r"hydra\.sweeper\.n_trials=(\d+)", command + " " + " ".join(shrink(command)))[-1]
        )
    # a cv=K job writes K fold summaries, its own and (cv.refit=true) the refit's
    folds = re.search(r"\bcv=(\d+)", command)
    each = 1 + int(folds[1]) + ("cv.refit=true" in command) if folds else 1
    if not is_multirun(command):
        return each
    values = [arg.split("=", 1)[1] for arg in command.split()[3:] if "=" in arg and not arg.startswith("cv=")]
    return each * len(list(itertools.product(*(v.split(",") for v in values))))


def place_torchvision_weights(command: str) -> None:
    """A downloaded-weights file for `model=<torchvision config>` (random tensors, right shapes)."""
    from torchvision.models import get_model, get_model_weights

    for name in re.findall(r"\bmodel=(\w+)", command):
        if "- torchvision" not in (CONF_DIR / "model" / f"{name}.yaml").read_text():
            continue
        path = torchvision_cache_file(get_model_weights(name).DEFAULT)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(get_model(name, weights=None).state_dict(), path)


def shrink(command: str) -> list[str]:
    """Overrides that shrink the work of a command (never its paths), and stand in for the GPUs
    this machine lacks."""
    extra = list(SHRINK)
    gpus = torch.cuda.device_count()
    if "trainer=gpu" in command and gpus == 0:
        extra.append("trainer.accelerator=cpu")
    if "trainer=ddp " in f"{command} " and gpus < 2:
        extra += ["trainer.accelerator=cpu", "trainer.devices=2"]
    if "hparams_search=optuna" in command:
        extra.append("hydra.sweeper.n_trials=2")
    return extra


def test_the_readme_shows_the_commands_users_need():
    commands = readme_commands(runnable_here=False)
    assert len(commands) >= 10
    for needed in ("strategy=feature_extract", " -m ", "data.root=$HOME", "trainer=ddp", "ckpt_path=",
                   "hparams_search=optuna", "hydra/launcher=submitit_local", "hydra/launcher=submitit_slurm",
                   "trainer=ddp_cpu", "data=csv data.file=", "task=multilabel",
                   "calibrate=false", "cv=5", "cv.refit=true"):  # fmt: skip
        assert any(needed in c for c in commands), needed
    slurm = next(c for c in commands if "submitit_slurm" in c)
    assert "hydra.launcher.partition=" in slurm and "trainer.devices=4" in slurm  # joined lines


@pytest.mark.slow
@pytest.mark.parametrize(
    "commands", segments(), ids=lambda group: " | ".join(c.removeprefix("python train.py ") for c in group)
)
def test_every_readme_train_command_works_as_written(tmp_path, commands):
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    generate_shapes(work / "data" / "demo_shapes", images_per_class=8, image_size=64)
    birds = generate_shapes(
        home / "data" / "birds", images_per_class=8, image_size=64, classes=("hexagon", "star")
    )
    # The CSV lines: the same birds listed in a CSV, and a multi-label CSV.
    rows = [f"{p.relative_to(home / 'data')},{p.parent.name}" for p in sorted(birds.glob("*/*.jpg"))]
    (home / "data" / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    multi = generate_multilabel_shapes(home / "data" / "multi", images=30, image_size=64)
    shutil.move(multi / "labels.csv", home / "data" / "multi.csv")
    text = (home / "data" / "multi.csv").read_text().replace("images/", "multi/images/")
    (home / "data" / "multi.csv").write_text(text)
    env = {
        **os.environ,
        "HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PROJECT_ROOT", None)
    resumes = 0
    for command in commands:
        place_torchvision_weights(command)
        line = command.replace("python train.py", f"python {REPO / 'train.py'}", 1)
        if "<date>" in line:  # the run folder of the latest run with a last.ckpt
            last = sorted((work / "logs" / "train" / "runs").glob("*/checkpoints/last.ckpt"))[-1]
            line = line.replace("<date>", last.parents[1].name)
        extra = shrink(line)
        if (
            "ckpt_path=" in command
        ):  # each resume trains the run one epoch further (a finished run is left as it is)
            resumes += 1
            extra = [e for e in extra if not e.startswith("trainer.max_epochs=")] + [
                f"trainer.max_epochs={1 + resumes}"
            ]
        started = time.time()
        words = shell_words(f"{line} {' '.join(extra)}", work, env)
        assert words[0] == "python", command
        result = run_python(words[1:], cwd=work, env=env)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{command}\n{output[-4000:]}"
        assert "Traceback" not in output, command
        if "ckpt_path=" in command:
            assert re.search(r"Resuming \S+ from last\.ckpt", output) and "epochs done" in output, (
                command,
                output[-2000:],
            )

        # Summaries this command wrote (a resumed run rewrites the one in its own folder).
        summaries = {p for p in (work / "logs").rglob("summary.json") if p.stat().st_mtime >= started}
        assert len(summaries) == jobs(command), command
        for path in summaries:
            summary = json.loads(path.read_text())
            if "cross-validation" in summary:  # a cv run's: the folds' mean ± std, its label issues
                assert 0 <= summary["cv"]["test/acc"]["mean"] <= 1 and "likely" in summary["label issues"]
                assert (path.parent / "oof_predictions.csv").is_file(), command
                continue
            assert 0 <= summary["test/map" if summary.get("task") == "multilabel" else "test/acc"] <= 1, (
                command
            )
            calibrated = "calibrate=false" not in command  # on by default: a temperature in the summary
            assert summary["calibration"].startswith("temperature" if calibrated else "off"), command
            assert 0 <= summary["test/ece"] <= 1 and 0 <= summary["test/ece_uncalibrated"] <= 1, command
            for key, value in summary.items():  # every file or folder the summary names exists
                if isinstance(value, str) and value.startswith("/"):
                    assert Path(value.split()[0]).exists(), (command, key, value)


def test_the_cluster_commands_of_the_readme_compose(tmp_path):
    """The SLURM command cannot run here; its overrides must at least be valid: Hydra composes
    it and the SLURM launcher receives every field."""
    for command in set(readme_commands(runnable_here=False)) - set(readme_commands()):
        # --cfg shows one job's config: the first value of each swept override.
        args = [re.sub(r"=([^,\[]+),\S+$", r"=\1", a) for a in command.split()[2:] if a != "-m"]
        result = run_python([REPO / "train.py", *args, "--cfg", "hydra"], cwd=tmp_path, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        launcher = yaml.safe_load(result.stdout)["hydra"]["launcher"]
        assert launcher["_target_"].endswith("SlurmLauncher")
        assert (launcher["partition"], launcher["gpus_per_node"], launcher["timeout_min"]) == ("gpu", 4, 240)
        assert launcher["tasks_per_node"] == "${.gpus_per_node}"  # one task per GPU


def outside_code(text: str, spans: bool = False) -> list[str]:
    """The lines of a Markdown text outside its code blocks; inline code spans blanked unless
    ``spans``."""
    lines, in_block = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
        elif not in_block:
            lines.append(line if spans else re.sub(r"`[^`]*`", lambda span: "`" * len(span[0]), line))
    return lines


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lowercase, backticks and punctuation but `-`
    and `_` dropped, spaces to `-`; a repeated heading gets `-1`, `-2`, ..."""
    anchors: set[str] = set()
    seen: collections.Counter[str] = collections.Counter()
    for line in outside_code(page.read_text(), spans=True):
        if heading := re.match(r"#{1,6}\s+(.*?)[\s#]*$", line):
            slug = re.sub(r"[^\w\- ]", "", heading[1].lower()).replace(" ", "-")
            anchors.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
            seen[slug] += 1
    return anchors


def test_every_relative_link_of_the_readme_and_its_guides_resolves():
    """Each `[text](target)` of README.md and docs/*.md that is not a web address names a file
    that exists (relative to the page's folder), and its `#anchor` one of that file's headings;
    every page in docs/ is a guide README hands a section on to (so that the tests above run its
    commands), and a command README's section shows in its place is one of the guide's."""
    pages = sorted(DOCS.glob("*.md"))
    assert sorted(guides()) == pages, (
        "every page in docs/ should be linked by a 'The whole guide:' line of README.md"
    )
    problems = []
    for page in [README, *pages]:
        name = page.relative_to(REPO)
        for target in re.findall(
            r"\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)", "\n".join(outside_code(page.read_text()))
        ):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, fragment = target.partition("#")
            file = (page.parent / path) if path else page
            if not file.exists():
                problems.append(f"{name}: ({target}): {os.path.relpath(file, REPO)} does not exist")
            elif fragment and fragment not in heading_anchors(file):
                problems.append(
                    f"{name}: ({target}): no heading of {os.path.relpath(file, REPO)} is #{fragment}"
                )
    assert not problems, "\n".join(problems)
    for section in re.split(r"\n(?=#{2,3} )", README.read_text()):
        if found := GUIDE.search(section):
            guide = (DOCS / found[1]).read_text()
            for command in re.findall(r"`((?:python|tl-)[^`]*)`", section):
                assert command in guide, (
                    f"README.md shows `{command}` for docs/{found[1]}, which does not have it"
                )


def serve_section_lines() -> tuple[str, str]:
    """The `tl-serve ckpt_path=...` and the first `curl -F file=@...` lines of docs/serving.md,
    the guide of README's "Serve it"."""
    lines = (DOCS / "serving.md").read_text().splitlines()
    serve = next(line for line in lines if line.startswith("tl-serve ckpt_path="))
    curl = next(line for line in lines if line.startswith("curl -F file=@"))
    return serve, curl


@pytest.mark.slow
def test_the_readme_curl_example_gives_tl_predicts_answer(tmp_path, trained_run, shapes_dir):
    """docs/serving.md's curl line as written (bash runs it), against a real tl-serve started as
    the page's line starts it; only the checkpoint and the port (any free one) differ."""
    from serving import assert_same, serving, tl_predict

    from helpers import best_checkpoint

    serve, curl = serve_section_lines()
    settings = serve.split()[2:]  # nothing but ckpt_path= today: a new setting in the line is passed on
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo_shapes").symlink_to(shapes_dir)  # where train.py's demo writes them
    image = tmp_path / curl.split("file=@", 1)[1].split()[0]
    assert image.is_file(), (
        f"docs/serving.md's curl line names {image.relative_to(tmp_path)}: not a demo image"
    )
    checkpoint = best_checkpoint(trained_run)
    with serving(checkpoint, *settings, log=tmp_path / "serve.log") as server:
        line = curl.replace("http://127.0.0.1:8000", server.url)
        assert line != curl, (
            "docs/serving.md's curl line should call http://127.0.0.1:8000, tl-serve's default"
        )
        env = {**os.environ, "no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"}  # the suite blocks the network
        done = subprocess.run(
            ["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["task"] == "multiclass"
    assert_same(answer["predictions"], tl_predict(tmp_path, checkpoint, [image])["predictions"], [image.name])
