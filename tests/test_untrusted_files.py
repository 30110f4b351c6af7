"""Files a user receives are data, never code (issue 30). A run folder, a checkpoint, a threshold
file or a sweep folder someone hands over is crafted here with payloads in every position (keys,
values, nested values, interpolations, YAML tags, billion-laughs anchors, huge files) and run
through the real commands: no payload runs (no marker file, no secret read), the refusal is one
line without a traceback, exit code 2, and the files the user has are left as they were. The
last test fails when a parsing call appears outside ``transfer_learning.readers``."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from forkrun import run_python
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from helpers import REPO, best_checkpoint
from transfer_learning import readers
from transfer_learning.data.datamodule import ImageDataModule
from transfer_learning.errors import CheckpointError
from transfer_learning.model.head_only import run_checkpoints
from transfer_learning.readers import UntrustedFileError
from transfer_learning.run.resume import RUN_SETTINGS, restorable, wandb_run_id

SECRET = "s3cr3t-value-of-the-user"  # in the environment: an interpolation that ran would leak it


def touch(marker: Path) -> str:
    """A Hydra override value that creates ``marker`` when instantiated."""
    return f"{{_target_:pathlib.Path.touch,self:{marker}}}"


def billion_laughs(top: str = "data") -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
    return "\n".join(lines) + f"\n{top}: *i\n"


def yaml_file_payloads(marker: Path, *, mapping: bool) -> dict[str, bytes]:
    """Whole files that are not plain settings (a list, or a mapping with ``data:``)."""
    head = "data:\n  root: /tmp\n" if mapping else "- seed=1\n"
    return {
        "python tag": (
            f"!!python/object/apply:pathlib.Path.touch ['{marker}']\n"
            if not mapping
            else f"data: !!python/object/apply:pathlib.Path.touch ['{marker}']\n"
        ).encode(),
        "tag on a nested value": (head + "extra: !!python/name:os.system {}\n").encode()
        if mapping
        else (head + "- !!python/name:os.system\n").encode(),
        "binary tag": (head + ("x: !!binary aGVsbG8=\n" if mapping else "- !!binary aGVsbG8=\n")).encode(),
        "billion laughs": billion_laughs().encode(),
        "huge": (head + ("# padding\n" * 120_000)).encode(),  # 1.2 MB of comments: over 1 MiB
        "deep nesting": (("x: " if mapping else "- ") + "[" * 20_000 + "]" * 20_000 + "\n").encode(),
        "not UTF-8": b"\xff\xfe\x00\x01garbage",
    }


def snapshot(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Every file under ``folder`` and a digest of its bytes (``skip``: relative paths left out)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and str(p.relative_to(folder)) not in skip
    }


def cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HYDRA_FULL_ERROR": "0",
        "SECRET_TOKEN": SECRET,
        **(env or {}),
    }
    return run_python(args, cwd=cwd, env=env)


def assert_refused(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit code 2, one error line naming ``needles``, no traceback, no secret."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output and SECRET not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.lower().startswith("error")]
    assert len(errors) == 1, output[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """A copy of a real finished one-epoch run (48 px, CSV logger): the folder someone gave you."""
    folder = tmp_path / "given" / "run"
    shutil.copytree(trained_run, folder)
    return folder


# -- the readers themselves ----------------------------------------------------------------


def test_the_yaml_reader_refuses_tags_anchors_huge_and_deep_files(tmp_path):
    marker = tmp_path / "pwned"
    for name, content in yaml_file_payloads(marker, mapping=True).items():
        path = tmp_path / f"{name}.yaml"
        path.write_bytes(content)
        with pytest.raises(UntrustedFileError, match=str(path)) as info:
            readers.read_config(path, fix="FIX")
        assert "FIX" in str(info.value) and "\n" not in str(info.value), name
    assert not marker.exists()
    plain = tmp_path / "plain.yaml"
    plain.write_text("data:\n  root: /photos\n  seed: 2026-01-01\n  sizes: [1, 2.5, null, true]\n")
    assert readers.read_config(plain, fix="") == {
        "data": {"root": "/photos", "seed": "2026-01-01", "sizes": [1, 2.5, None, True]}
    }  # a date stays text: nothing but plain values comes out


def test_config_files_refuse_interpolations_in_any_position(tmp_path):
    for text, field in [
        ("data:\n  root: ${oc.env:SECRET_TOKEN}\n", "data.root"),
        ("data:\n  extra:\n    - ok\n    - '${oc.env:HOME}'\n", "data.extra[1]"),
        ("data:\n  root: /x/\\${escaped}\n", "data.root"),
    ]:
        path = tmp_path / "run_config.yaml"
        path.write_text(text)
        with pytest.raises(UntrustedFileError, match=rf"{field.replace('[', '.').replace(']', '.')} holds"):
            readers.read_config(path, fix="")


def test_the_json_reader_caps_size_and_depth_and_refuses_fifos(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UntrustedFileError, match="nested"):
        readers.read_json(deep, fix="")
    huge = tmp_path / "huge.json"
    huge.write_text('{"max_softmax_threshold": 0.5, "pad": "' + "x" * (2 << 20) + '"}')
    with pytest.raises(UntrustedFileError, match=r"2\.0 MiB, over the 1\.0 MiB"):
        readers.read_json(huge, fix="")
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(UntrustedFileError, match="not a regular file"):
        readers.read_json(fifo, fix="")  # returns at once: a FIFO is never opened
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")
    with pytest.raises(UntrustedFileError, match="character device"):
        readers.read_json(zero, fix="")


def test_a_checkpoint_holding_anything_but_tensors_and_plain_values_is_refused(tmp_path):
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"a": [1, {"b": "c"}]}}, path)
    assert readers.read_checkpoint(path)["hyper_parameters"] == {"a": [1, {"b": "c"}]}
    torch.save({"hyper_parameters": {b"bytes": 1}}, path)  # bytes pass weights_only, not this reader
    with pytest.raises(
        CheckpointError, match=r"refusing checkpoint .*x\.ckpt: hyper_parameters has a bytes key"
    ):
        readers.read_checkpoint(path)
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match="holds a list, not a checkpoint"):
        readers.read_checkpoint(path)


# -- saved settings: the allow-list ----------------------------------------------------------


def setting_payloads(marker: Path) -> list[str]:
    """Saved settings that each name code, read a secret or move where files go."""
    return [
        f"+callbacks.pwn={touch(marker)}",  # the report's reproduction: a dict value with _target_
        f"++callbacks.pwn={touch(marker)}",
        f"callbacks.model_checkpoint={touch(marker)}",  # a known key, a dict value
        f"trainer.plugins=[{touch(marker)}]",  # a list holding a dict
        "callbacks.model_checkpoint._target_=pathlib.Path.touch",  # payload in the key
        f"callbacks.model_checkpoint.self={marker}",  # not a setting the config has
        "trainer.max_epochs=${oc.env:SECRET_TOKEN}",  # interpolation (resolver)
        "data.root='${oc.env:SECRET_TOKEN}'",
        "~callbacks.early_stopping",
        "model=../../../tmp/payload",  # a group option outside conf/
        "strategy@callbacks.pwn=feature_extract",
        f"hydra.callbacks.pwn={touch(marker)}",
        "hydra.run.dir=/tmp/elsewhere",
        "seed=1,2",
        "seed=range(1,3)",
        f"callbacks.model_checkpoint.dirpath={marker.parent / 'elsewhere'}",
        "paths.log_dir=/tmp/elsewhere",
        "not a setting at all ][",
    ]


def test_only_plain_values_of_known_settings_and_real_config_options_come_back():
    marker = Path("/tmp/never")
    good = ["strategy=gradual_unfreeze", "strategy.freeze_epochs=2", "trainer.max_epochs=4", "seed=int(7)",
            "data.root='/photos/my birds'", "trainer.devices=[0,1]", "model=resnet18"]  # fmt: skip
    kept, refused = restorable([*good, *setting_payloads(marker)])
    assert kept == good
    assert [s for s, _ in refused] == setting_payloads(marker)
    reasons = dict(refused)
    assert reasons[f"+callbacks.pwn={touch(marker)}"] == "it adds or deletes a setting (+ or ~)"
    assert "interpolation" in reasons["trainer.max_epochs=${oc.env:SECRET_TOKEN}"]
    assert "not one of the model configs" in reasons["model=../../../tmp/payload"]
    assert "mapping" in reasons[f"callbacks.model_checkpoint={touch(marker)}"]
    assert "where files are written" in reasons["paths.log_dir=/tmp/elsewhere"]
    assert (
        "has no setting callbacks.model_checkpoint.self"
        in reasons[f"callbacks.model_checkpoint.self={marker}"]
    )


def test_a_key_of_another_group_option_is_known_only_with_that_option():
    assert restorable(["data.file=labels.csv"])[0] == []  # data=demo has no data.file
    assert restorable(["data=csv", "data.file=labels.csv"])[0] == ["data=csv", "data.file=labels.csv"]
    assert restorable(["data.file=labels.csv"], now=["data=csv"])[0] == ["data.file=labels.csv"]


@pytest.mark.slow
def test_the_reported_resume_runs_nothing_and_names_the_refused_setting(run_copy, tmp_path):
    """The issue's reproduction as typed: a finished run's saved settings edited to add a callback
    that touches a file, then `python train.py ckpt_path=<run>/checkpoints/last.ckpt`."""
    marker = tmp_path / "PWNED_RESUME"
    saved = run_copy / RUN_SETTINGS
    kept = [o for o in readers.read_string_list(saved, fix="") if "max_epochs" not in o]
    payload = f"+callbacks.pwn={touch(marker)}"
    saved.write_text("".join(f"- '{o}'\n" for o in [*kept, "trainer.max_epochs=2", payload]))  # as edited
    result = cli([str(REPO / "train.py"), f"ckpt_path={run_copy}/checkpoints/last.ckpt"], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert not marker.exists() and "Traceback" not in output
    warnings = [line for line in output.splitlines() if "not restoring" in line]
    assert len(warnings) == 1 and payload in warnings[0] and str(saved) in warnings[0], output[-3000:]
    assert "Continuing" in output and "1 of 2 epochs done" in output
    summary = readers.read_json(run_copy / "summary.json", fix="")
    assert summary["epochs run"] == 2  # the run went on, without the payload


@pytest.mark.slow
def test_every_setting_payload_is_left_out_of_a_real_resume(run_copy, tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "payload.yaml").write_text(f"_target_: pathlib.Path.touch\nself: {marker}\n")
    saved = run_copy / RUN_SETTINGS
    payloads = setting_payloads(marker)
    saved.write_text(json.dumps([*readers.read_string_list(saved, fix=""), *payloads]))  # JSON is YAML
    hydra_files = (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "train.log")
    before, log = snapshot(run_copy, skip=hydra_files), (run_copy / "train.log").read_text()
    result = cli([str(REPO / "train.py"), f"ckpt_path={run_copy}/checkpoints/last.ckpt"], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]  # a finished run: reported, not trained again
    assert "has already finished" in output and "Traceback" not in output and SECRET not in output
    assert not marker.exists() and not (tmp_path / "elsewhere").exists()
    warnings = [line for line in output.splitlines() if "not restoring" in line]
    assert len(warnings) == len(payloads), output[-4000:]
    for payload, line in zip(payloads, warnings, strict=True):
        assert repr(payload)[:200] in line and str(saved) in line
    assert snapshot(run_copy, skip=hydra_files) == before
    assert (run_copy / "train.log").read_text().startswith(log)  # what it says now is added at the end


@pytest.mark.parametrize("name", list(yaml_file_payloads(Path("/m"), mapping=False)))
@pytest.mark.parametrize("which", ["run_overrides.yaml", "overrides.yaml"])
def test_a_crafted_settings_file_stops_the_resume_with_one_line_and_changes_nothing(
    run_copy, tmp_path, name, which
):
    marker = tmp_path / "pwned"
    if which == "overrides.yaml":  # a run without run_overrides.yaml: Hydra's file is read instead
        (run_copy / RUN_SETTINGS).unlink()
    path = run_copy / ".hydra" / which
    path.write_bytes(yaml_file_payloads(marker, mapping=False)[name])
    before = snapshot(run_copy)
    result = cli([str(REPO / "train.py"), f"ckpt_path={run_copy}/checkpoints/last.ckpt"], tmp_path)
    assert_refused(result, str(path), "ckpt_path")
    assert not marker.exists()
    assert snapshot(run_copy) == before


def test_a_wandb_run_id_is_taken_from_a_folder_name_only_when_it_is_one(tmp_path):
    wandb = tmp_path / "wandb"
    (wandb / "offline-run-20261205_160726-gax63vkn").mkdir(parents=True)
    assert wandb_run_id(tmp_path) == "gax63vkn"
    (wandb / "offline-run-20261205_160727-..").mkdir()  # newer, and not an id
    assert wandb_run_id(tmp_path) is None


# -- run_config.yaml: eval.py ----------------------------------------------------------------


@pytest.mark.slow
def test_eval_refuses_a_crafted_run_config_in_every_position(run_copy, tmp_path):
    marker = tmp_path / "pwned"
    config = run_copy / "run_config.yaml"
    real = config.read_text()
    best = best_checkpoint(run_copy)
    cases = {name: content.decode("utf-8", "replace") for name, content in
             yaml_file_payloads(marker, mapping=True).items() if name != "not UTF-8"}  # fmt: skip
    cases |= {
        "interpolation": real.replace("root: ", "root: ${oc.env:SECRET_TOKEN}", 1),
        "resolver in a list": real + "  extra: [a, '${oc.env:SECRET_TOKEN}']\n",
        "_target_": f"data:\n  _target_: builtins.open\n  file: {marker}\n  mode: w\n",
        "nested _target_": real.replace(
            "root: ", f"root:\n    _target_: pathlib.Path.touch\n    self: {marker}\n    x: ", 1
        ),
    }  # fmt: skip
    before = snapshot(run_copy, skip=("run_config.yaml",))
    for name, content in cases.items():
        config.write_text(content)
        result = cli([str(REPO / "eval.py"), f"ckpt_path={best}", f"hydra.run.dir={tmp_path}/eval"], tmp_path)
        line = assert_refused(result, str(config))
        assert "refusing" in line or "cannot read" in line, (name, line)
        assert not marker.exists(), name
    assert snapshot(run_copy, skip=("run_config.yaml",)) == before


# -- threshold files: predict and export -----------------------------------------------------


@pytest.mark.slow
def test_predict_refuses_a_crafted_threshold_file(run_copy, tmp_path, shapes_dir):
    marker = tmp_path / "pwned"
    best = best_checkpoint(run_copy)
    threshold = best.with_name(f"{best.stem}.threshold.json")
    image = next(shapes_dir.glob("circle/*.jpg"))
    cases = {
        "a dict with _target_": json.dumps({"max_softmax_threshold": {"_target_": "pathlib.Path.touch",
                                                                      "self": str(marker)}}),
        "an interpolation": json.dumps({"max_softmax_threshold": "${oc.env:SECRET_TOKEN}"}),
        "NaN": '{"max_softmax_threshold": NaN}',
        "deep nesting": '{"max_softmax_threshold": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "huge": json.dumps({"max_softmax_threshold": 0.5, "pad": "x" * (2 << 20)}),
        "not JSON": "max_softmax_threshold: !!python/object/apply:os.system ['touch x']",
        "a list": "[0.5]",
    }  # fmt: skip
    predict = ["-m", "transfer_learning.results.predict", f"ckpt_path={best}", f"images={image}",
               f"output={tmp_path}/predictions.csv"]  # fmt: skip
    before = snapshot(run_copy, skip=(str(threshold.relative_to(run_copy)),))
    for name, content in cases.items():
        threshold.write_text(content)
        assert_refused(cli(predict, tmp_path), str(threshold))
        assert not marker.exists(), name
        assert threshold.read_text() == content
    assert not (tmp_path / "predictions.csv").exists()
    assert snapshot(run_copy, skip=(str(threshold.relative_to(run_copy)),)) == before


# -- weights: a file named by model.weights, the $TORCH_HOME cache -------------------------


class Trap:
    """Unpickling this creates a file: the proof that something ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.slow
def test_pickled_weights_run_nothing_from_model_weights_or_the_torch_hub_cache(tmp_path, shapes_dir):
    """torchvision reads its cache with weights_only=False: the file a shared or copied
    $TORCH_HOME holds is read pickle-free all the same."""
    from torchvision.models import ResNet18_Weights

    from transfer_learning.model.backbones.torchvision_models import torchvision_cache_file

    marker, torch_home = tmp_path / "pwned", tmp_path / "torch_home"
    weights = tmp_path / "weights.pth"
    torch.save({"conv1.weight": Trap(marker)}, weights)
    train = [str(REPO / "train.py"), f"data.root={shapes_dir}", "input.image_size=32", "logger=csv",
             f"hydra.run.dir={tmp_path}/run", "data.num_workers=0"]  # fmt: skip
    env = {"TORCH_HOME": str(torch_home), "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    assert_refused(cli([*train, f"model.weights={weights}"], tmp_path, env), str(weights))
    assert not marker.exists()
    os.environ["TORCH_HOME"], saved = str(torch_home), os.environ["TORCH_HOME"]
    try:
        cache = torchvision_cache_file(ResNet18_Weights.IMAGENET1K_V1)
    finally:
        os.environ["TORCH_HOME"] = saved
    cache.parent.mkdir(parents=True)
    torch.save({"conv1.weight": Trap(marker)}, cache)
    assert_refused(cli([*train, "model=resnet18"], tmp_path, env), f"refusing cached weights {cache}")
    assert not marker.exists() and cache.is_file()  # the user's file is named, not deleted


# -- CSV label files ------------------------------------------------------------------------


def test_csv_cells_that_look_like_code_or_interpolations_stay_text(tmp_path, monkeypatch):
    """A label file is read cell by cell as text: a label spelled like an interpolation or a
    config node is a class name, resolved by nothing (and its secret never read)."""
    monkeypatch.setenv("SECRET_TOKEN", SECRET)
    labels = ["${oc.env:SECRET_TOKEN}", "{_target_:os.system,command:touch x}", "!!python/name:os.system"]
    rows = ["path,label"]
    for n in range(12):
        Image.new("RGB", (32, 32), (20 * n, 0, 0)).save(tmp_path / f"{n}.jpg")
        rows.append(f'{n}.jpg,"{labels[n % 3]}"')
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    dm = ImageDataModule(source="csv", file=str(tmp_path / "labels.csv"), batch_size=4, num_workers=0)
    assert sorted(dm.discover()) == sorted(labels)
    assert not (tmp_path / "x").exists()


# -- checkpoints: callback states ------------------------------------------------------------


@pytest.mark.slow
def test_damaged_random_states_in_a_checkpoint_stop_the_resume_with_one_line(run_copy, tmp_path):
    last = run_copy / "checkpoints" / "last.ckpt"
    checkpoint = readers.read_checkpoint(last)
    checkpoint["callbacks"]["RandomState"]["epoch_start"]["python"]["state"] = ["x"]
    torch.save(checkpoint, last)
    before = snapshot(run_copy)
    result = cli([str(REPO / "train.py"), f"ckpt_path={last}", "trainer.max_epochs=2"], tmp_path)
    assert_refused(result, "callbacks.RandomState", "damaged")
    hydra_files = (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml")
    after = snapshot(run_copy, skip=(*hydra_files, "train.log"))
    assert after == {k: v for k, v in before.items() if k not in (*hydra_files, "train.log")}


def test_files_a_checkpoints_callback_state_names_outside_its_folder_are_not_the_runs(tmp_path):
    """A resumed ModelCheckpoint takes best_model_path and best_k_models from the file as they
    are: the checkpoints completed after fitting are only those in the callback's own folder."""
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    own, victim = folder / "best-epoch01.ckpt", tmp_path / "my_other_model.ckpt"
    for path in (own, victim):
        path.write_bytes(b"x")
    callback = ModelCheckpoint(dirpath=folder)
    callback.load_state_dict({
        "dirpath": str(folder), "best_model_score": None, "best_model_path": str(victim),
        "best_k_models": {str(victim): 0.9, str(own): 0.5, str(folder / "../../escape.ckpt"): 0.1},
        "kth_best_model_path": "", "kth_value": 0.0, "last_model_path": "/etc/passwd",
    })  # fmt: skip
    trainer = L.Trainer(callbacks=[callback], logger=False, enable_progress_bar=False)
    assert run_checkpoints(trainer) == [own]


# -- sweep folders: scripts/sweep_table.py ---------------------------------------------------


def test_sweep_table_refuses_crafted_job_records(tmp_path):
    sweep = tmp_path / "sweep"
    marker = tmp_path / "pwned"
    job = sweep / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
    good = {"job": 0, "overrides": ["seed=1"], "status": "ok", "metrics": {"val/acc": 0.5},
            "output_dir": str(job)}  # fmt: skip
    cases = {
        "a list": "[1, 2]",
        "overrides holding a dict": json.dumps({**good, "overrides": [{"_target_": "os.system"}]}),
        "metrics not a mapping": json.dumps({**good, "metrics": "x"}),
        "deep nesting": '{"job": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "huge": json.dumps({**good, "pad": "x" * (2 << 20)}),
    }
    for name, content in cases.items():
        (job / "job.json").write_text(content)
        before = snapshot(sweep)
        result = cli([str(REPO / "scripts" / "sweep_table.py"), str(sweep)], tmp_path)
        assert_refused(result, str(job / "job.json"))
        assert snapshot(sweep) == before, name
    (job / "job.json").unlink()
    (job / ".hydra" / "overrides.yaml").write_text(
        f"- !!python/object/apply:pathlib.Path.touch ['{marker}']\n"
    )
    assert_refused(cli([str(REPO / "scripts" / "sweep_table.py"), str(sweep)], tmp_path), "overrides.yaml")
    assert not marker.exists()
    (job / "job.json").write_text(json.dumps(good))
    done = cli([str(REPO / "scripts" / "sweep_table.py"), str(sweep)], tmp_path)
    assert done.returncode == 0 and "seed=1" in done.stdout, done.stdout + done.stderr


# -- no parsing call outside the readers -----------------------------------------------------

# Calls that turn a file's bytes into values or objects: (module or object name, function).
PARSERS = {
    "json": {"load", "loads"},
    "yaml": {"load", "safe_load", "full_load", "unsafe_load", "load_all", "safe_load_all", "full_load_all"},
    "torch": {"load"},
    "jit": {"load"},
    "np": {"load", "loadtxt", "genfromtxt", "fromfile"},
    "numpy": {"load", "loadtxt", "genfromtxt", "fromfile"},
    "OmegaConf": {"load"},
    "csv": {"reader", "DictReader"},
    "pickle": {"load", "loads", "Unpickler"},
    "marshal": {"load", "loads"},
    "shelve": {"open"},
    "onnx": {"load", "load_model"},
    "pd": {"read_csv", "read_pickle", "read_json"},
}
BARE = {"load_file", "eval", "exec", "__import__"}  # safetensors' load_file; Python's own
# Calls that name code to run: allowed where the names come from conf/, the command line or the
# package's own folders, never from a file read back (those go through run/registry.py).
CODE = {"instantiate", "get_class", "get_method", "import_module"}
PKG = "src/transfer_learning/"
OWN_MODULES = "the package's own modules, listed from its folder"
ALLOWED = {
    (PKG + "results/export.py", "torch.jit.load"): "the parity check loads the file it just wrote",
    ("scripts/benchmark.py", "json.loads"): "the RESULT lines its own child processes print",
    (
        PKG + "serve/uploads.py",
        "json.loads",
    ): "a request's JSON body (plain values, size bounded), not a file",
    (PKG + "model/optimization.py", "instantiate"): "optimizer and scheduler of the composed config",
    (PKG + "results/evaluate.py", "instantiate"): "the data module of the composed config only",
    (PKG + "run/config.py", "instantiate"): "the one build path, from the composed config",
    (PKG + "pipelines/train.py", "instantiate"): "callbacks, loggers and Trainer of the composed config",
    (PKG + "pipelines/cross_validation.py", "instantiate"): "the cv run's W&B logger, of the composed config",
    ("scripts/benchmark_baselines.py", "instantiate"): "backbones of conf/model",
    (PKG + "model/backbones/__init__.py", "importlib.import_module"): OWN_MODULES,
    (PKG + "model/strategies/__init__.py", "importlib.import_module"): OWN_MODULES,
    (PKG + "data/sources/__init__.py", "importlib.import_module"): OWN_MODULES,
    (PKG + "results/predict/__init__.py", "importlib.import_module"): "its own modules, named in _HOMES",
}


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def parsing_calls(source: str) -> list[str]:
    """The dotted names of the parsing and code-naming calls in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        parts = name.split(".")
        owner, last = (parts[-2] if len(parts) > 1 else ""), parts[-1]
        if last in PARSERS.get(owner, ()) or (len(parts) == 1 and last in BARE) or last in CODE:
            found.append(name)
    return found


def test_no_file_is_parsed_and_no_code_is_named_outside_the_readers_and_the_allow_list():
    files = [*sorted((REPO / "src").rglob("*.py")), *sorted((REPO / "scripts").rglob("*.py")),
             REPO / "train.py", REPO / "eval.py"]  # fmt: skip
    seen: Counter[tuple[str, str]] = Counter()
    for path in files:
        relative = str(path.relative_to(REPO))
        if relative.startswith("src/transfer_learning/readers/"):
            continue
        for name in parsing_calls(path.read_text(encoding="utf-8")):
            seen[relative, name] += 1
    unexpected = sorted(set(seen) - set(ALLOWED))
    assert not unexpected, (
        f"{unexpected}: read files through transfer_learning.readers (plain values only), or, for a "
        "call that never sees a file a user receives, add it to ALLOWED with the reason"
    )
    assert set(ALLOWED) <= set(seen), f"stale entries: {sorted(set(ALLOWED) - set(seen))}"


def test_the_call_site_scan_finds_each_kind_of_call():
    source = (
        "import json, yaml, torch, numpy as np\nfrom omegaconf import OmegaConf\n"
        "json.loads(t); yaml.safe_load(t); torch.load(f); torch.jit.load(f); np.load(f)\n"
        "OmegaConf.load(f); csv.DictReader(f); pickle.loads(b); load_file(f); eval(s)\n"
        "hydra.utils.instantiate(c); importlib.import_module(n); print(json.dumps(x))\n"
    )
    assert sorted(parsing_calls(source)) == sorted([
        "json.loads", "yaml.safe_load", "torch.load", "torch.jit.load", "np.load", "OmegaConf.load",
        "csv.DictReader", "pickle.loads", "load_file", "eval", "hydra.utils.instantiate",
        "importlib.import_module",
    ])  # fmt: skip
