"""Sweeps through the real CLI: the results table, Optuna, submitit, DDP inside a multirun, and
run folders that never collide. Every run starts `python train.py` in a fresh folder as a user
would, without overriding any output path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from forkrun import start_python
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from helpers import REPO, confusion_counts, read_sweep_table, read_wandb_run, sweep_dirs, train_cli
from transfer_learning.errors import ConfigError
from transfer_learning.results.sweep_table import sweep_rows, write_tables
from transfer_learning.run.config import compose_config
from transfer_learning.run.sweeps import JOB_FILE, metric_mode, run_task

METRIC = "val/acc_best"


def tiny(shapes_dir: Path, epochs: int = 2) -> list[str]:
    return [
        "data=imagefolder",
        f"data.root={shapes_dir}",
        "input.image_size=48",
        "data.num_workers=0",
        f"trainer.max_epochs={epochs}",
    ]


def check_sorted_with_best_marked(rows: list[dict[str, str]], mode: str = "max") -> None:
    scores = [float(r[METRIC]) for r in rows if r["status"] == "ok"]
    assert scores == sorted(scores, reverse=mode == "max")
    assert [r["best"] for r in rows] == ["*"] + [""] * (len(rows) - 1)


@pytest.mark.slow
def test_a_four_job_multirun_writes_one_sorted_table_and_groups_the_jobs_on_wandb(tmp_path, shapes_dir):
    result = train_cli(
        tmp_path,
        "-m",
        *tiny(shapes_dir),
        "strategy.head_lr=0.001,0.1",
        "data.batch_size=8,32",
        "worst_samples=4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Sweep summary: 4 jobs, 0 failed, sorted by val/acc_best (max)" in result.stdout
    (sweep,) = sweep_dirs(tmp_path)
    rows = read_sweep_table(sweep)
    assert len(rows) == 4
    check_sorted_with_best_marked(rows)
    # Each row: the overrides that differ between jobs, and the numbers of the job's own folder.
    assert sorted(r["overrides"] for r in rows) == sorted(
        f"strategy.head_lr={lr} data.batch_size={bs}" for lr in ("0.001", "0.1") for bs in (8, 32)
    )
    assert sorted(Path(r["output_dir"]).name for r in rows) == ["0", "1", "2", "3"]
    groups, names = set(), set()
    for row in rows:
        summary = json.loads((Path(row["output_dir"]) / "summary.json").read_text())
        assert float(row[METRIC]) == pytest.approx(summary["best val/acc"])
        assert float(row["test/acc"]) == pytest.approx(summary["test/acc"])
        bounds = (summary["test/acc_ci95_low"], summary["test/acc_ci95_high"])
        assert row["test/acc 95 %"] == f"[{bounds[0]:.3f}, {bounds[1]:.3f}]"
        assert row["epochs"] == "2" and row["status"] == "ok"
        (wandb_dir,) = (Path(row["output_dir"]) / "wandb").glob("offline-run-*")
        run = read_wandb_run(wandb_dir)["run"]
        groups.add(run["run_group"])
        names.add(run["display_name"])
    assert groups == {f"train-{sweep.name}"}  # one W&B group per sweep: <task_name>-<sweep folder>
    assert len(names) == 4
    markdown = (sweep / "sweep_results.md").read_text()
    best, second = rows[0], rows[1]
    lead = check_lead(best, second)
    assert markdown.count("\n") == 8 and "| * |" in markdown and markdown.splitlines()[-1].startswith(lead)
    assert f"best: job {best['job']} ({best['overrides']})" in result.stdout
    assert lead in result.stdout


def check_lead(best: dict, second: dict) -> str:
    """The sweep's lead line, recomputed from the two jobs' test_predictions.json by the
    per-resample loop (accuracy from torch, not the vectorised counts): the same numbers."""
    from transfer_learning.results.intervals import paired_bootstrap
    from transfer_learning.results.test_predictions import read_test_predictions

    a = read_test_predictions(Path(best["output_dir"]) / "test_predictions.json")
    b = read_test_predictions(Path(second["output_dir"]) / "test_predictions.json")
    assert a.files == b.files and len(a.files) > 0
    right_a, right_b = a.probs.argmax(1) == a.targets, b.probs.argmax(1) == b.targets
    assert float(right_a.double().mean()) == pytest.approx(float(best["test/acc"]))

    def accuracy(right):
        return lambda i: float(right[i].double().mean())

    found = paired_bootstrap(accuracy(right_a), accuracy(right_b), len(a.files), 1000, 0)
    assert found["difference"] == pytest.approx(float(best["test/acc"]) - float(second["test/acc"]))
    verdict = "inside the noise" if found["low"] <= 0 <= found["high"] else "outside the noise"
    jobs = f"job {best['job']} over job {second['job']}"
    low, high, images = found["low"], found["high"], len(a.files)
    return (f"lead of {jobs} on test/acc: {found['difference']:+.4f}, 95 % [{low:+.3f}, {high:+.3f}] "
            f"(paired bootstrap, {images} test images): {verdict}")  # fmt: skip


@pytest.mark.slow
def test_a_failed_job_gets_a_row_with_its_error_and_the_other_jobs_go_on(tmp_path, shapes_dir):
    result = train_cli(tmp_path, "-m", *tiny(shapes_dir, epochs=1), "strategy.head_lr=-1,0.01", "logger=csv")
    assert result.returncode == 1  # the sweep ran to the end, then said a job failed
    assert "1 of 2 sweep jobs failed" in result.stdout + result.stderr
    (sweep,) = sweep_dirs(tmp_path)
    failed, ok = sorted(read_sweep_table(sweep), key=lambda r: r["status"] == "ok")
    assert ok["status"] == "ok" and ok["best"] == "*" and ok["overrides"] == "strategy.head_lr=0.01"
    assert (Path(ok["output_dir"]) / "checkpoints" / "last.ckpt").is_file()  # ran after the failure
    assert failed["status"] == "failed: strategy.head_lr=-1: a learning rate must be positive."
    assert failed[METRIC] == "" and failed["best"] == ""
    assert "a learning rate must be positive" in (Path(failed["output_dir"]) / "train.log").read_text()


@pytest.mark.slow
def test_optuna_search_of_three_trials_returns_and_records_the_best_value(tmp_path, shapes_dir):
    args = ["hparams_search=optuna", "hydra.sweeper.n_trials=3", *tiny(shapes_dir, epochs=1), "logger=csv"]
    result = train_cli(tmp_path, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = sweep_dirs(tmp_path)
    optuna = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    rows = read_sweep_table(sweep)
    assert len(rows) == 3
    check_sorted_with_best_marked(rows)
    assert optuna["best_value"] == pytest.approx(float(rows[0][METRIC]))
    # The best trial's parameters are the best row's job's overrides.
    best_job = json.loads((Path(rows[0]["output_dir"]) / JOB_FILE).read_text())
    chosen = dict(o.split("=", 1) for o in best_job["overrides"])
    for name, value in optuna["best_params"].items():
        assert chosen[name] == str(value), name
    # Every searched parameter reached the trial's config.
    assert {"strategy", "strategy.head_lr", "++strategy.backbone_lr", "optimizer.weight_decay",
            "label_smoothing"} <= set(chosen)  # fmt: skip

    # A fixed sampler seed: the same command proposes the same trials.
    again = train_cli(tmp_path, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    first, second = sweep_dirs(tmp_path)

    def proposals(sweep: Path) -> list[list[str]]:
        jobs = [json.loads(p.read_text()) for p in sorted(sweep.glob(f"*/{JOB_FILE}"))]
        return [job["overrides"] for job in sorted(jobs, key=lambda j: j["job"])]

    assert proposals(first) == proposals(second)


@pytest.mark.slow
def test_submitit_local_runs_each_job_in_its_own_process(tmp_path, shapes_dir):
    result = train_cli(
        tmp_path, "-m", "hydra/launcher=submitit_local", *tiny(shapes_dir, epochs=1),
        "strategy.head_lr=0.01,0.1", "logger=csv",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validated against ConfigStore schema" not in result.stderr
    (sweep,) = sweep_dirs(tmp_path)
    rows = read_sweep_table(sweep)
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    check_sorted_with_best_marked(rows)
    jobs = [json.loads((Path(r["output_dir"]) / JOB_FILE).read_text()) for r in rows]
    # Two submitit jobs (their folders in .submitit/), each training in a process of its own.
    submitted = {p.name for p in (sweep / ".submitit").iterdir() if p.name.isdigit()}
    assert {job["cluster_job_id"] for job in jobs} == submitted and len(submitted) == 2
    assert len({job["pid"] for job in jobs}) == 2
    for job_id in submitted:
        assert (sweep / ".submitit" / str(job_id) / f"{job_id}_0_result.pkl").is_file()


@pytest.mark.slow
def test_ddp_inside_a_multirun_keeps_each_jobs_processes_in_that_jobs_folder(tmp_path, shapes_dir):
    """Two jobs, each a 2-process gloo DDP run. Lightning alone would start the workers with
    `-m` and every swept value again, write them to a `runs/` folder, and hang the second job on
    the first one's port and process group."""
    result = train_cli(
        tmp_path, "-m", "trainer=ddp_cpu", *tiny(shapes_dir), "strategy.head_lr=0.01,0.1", "logger=csv",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = sweep_dirs(tmp_path)  # no nested sweep started by a worker
    assert not (tmp_path / "logs" / "train" / "runs").exists()
    rows = read_sweep_table(sweep)
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    for row in rows:
        job = Path(row["output_dir"])
        summary = json.loads((job / "summary.json").read_text())
        assert summary["batch size"] == "32 feature vectors per device x 2 devices = 64"
        worker_log = (job / "ddp_process_1.log").read_text()
        assert "GLOBAL_RANK: 1, MEMBER: 2/2" in worker_log
        assert "Seed set to 42" in worker_log
        # Validation counted every image once across the two processes.
        counts = confusion_counts(job)
        assert sum(map(sum, counts)) == int(summary["images train/val/test"].split("/")[2])


@pytest.mark.slow
def test_runs_started_at_the_same_moment_get_their_own_folders(tmp_path, shapes_dir):
    command = [REPO / "train.py", *tiny(shapes_dir, epochs=1), "logger=csv"]
    runs = [start_python(command, tmp_path) for _ in range(2)]
    for run in runs:
        _, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr[-3000:]
    folders = sorted((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(folders) == 2
    for folder in folders:
        assert json.loads((folder / "summary.json").read_text())["output dir"] == str(folder)
        assert (folder / "csv" / "metrics.csv").is_file()


# -- the parts, without training ------------------------------------------------------------


def records(*jobs: tuple[int, list[str], str, float | None]) -> list[dict]:
    return [
        {"job": n, "overrides": o, "status": s, "error": None if s == "ok" else "boom",
         "metrics": {} if v is None else {"val/loss": v, "val/acc_best": v}, "output_dir": f"/x/{n}"}
        for n, o, s, v in jobs
    ]  # fmt: skip


def test_rows_are_sorted_by_the_metric_in_its_direction_and_failed_jobs_come_last(tmp_path):
    jobs = records(
        (0, ["a=1", "lr=1"], "ok", 0.5),
        (1, ["a=1", "lr=2"], "failed", None),
        (2, ["a=1", "lr=3"], "ok", 0.2),
        (3, ["a=1", "lr=4"], "ok", 0.9),
    )
    rows = sweep_rows(jobs, "val/loss", "min")
    assert [r["job"] for r in rows] == [2, 0, 3, 1]
    assert [r["best"] for r in rows] == ["*", "", "", ""]
    assert [r["overrides"] for r in rows] == ["lr=3", "lr=1", "lr=4", "lr=2"]  # the shared a=1 is left out
    assert rows[-1]["status"] == "failed: boom"
    assert [r["job"] for r in sweep_rows(jobs, "val/acc_best", "max")] == [3, 0, 2, 1]
    csv_path, md_path, markdown = write_tables(rows, tmp_path)
    assert csv_path.read_text().splitlines()[1].startswith("*,2,lr=3,0.2")
    assert md_path.read_text() == markdown and markdown.splitlines()[2].startswith(
        "| * | 2 | lr=3 | 0.2000 |"
    )


def test_no_job_succeeded_means_no_best_row():
    rows = sweep_rows(records((0, ["lr=1"], "failed", None)), "val/acc_best", "max")
    assert rows[0]["best"] == ""


def test_the_metric_direction_follows_the_sweeper_then_the_metric_name():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from transfer_learning.run.config import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        optuna = compose("train", overrides=["hparams_search=optuna"], return_hydra_config=True)
        minimize = compose(
            "train", overrides=["hparams_search=optuna", "hydra.sweeper.direction=minimize"],
            return_hydra_config=True,
        )  # fmt: skip
    assert metric_mode(optuna, "val/loss") == "max"
    assert metric_mode(minimize, "val/acc") == "min"
    assert metric_mode(None, "val/loss") == "min"
    assert metric_mode(None, "val/acc_best") == "max"


@pytest.fixture
def multirun_job(tmp_path: Path):
    """A composed config in the state Hydra gives job 0 of a multirun (mode, number, overrides)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from transfer_learning.run.config import CONF_DIR

    overrides = ["strategy.head_lr=0.5"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "0")
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.job.num = 0
        cfg.hydra.overrides.task = overrides
    HydraConfig.instance().set_config(cfg)
    yield cfg
    HydraConfig.instance().cfg = None  # later tests are single runs again


def test_a_crashing_multirun_job_is_recorded_and_returns_none(tmp_path, multirun_job):
    cfg = multirun_job

    def crash(_cfg):
        raise RuntimeError("out of memory, say")

    assert run_task(cfg, crash) is None
    job = json.loads((tmp_path / "0" / JOB_FILE).read_text())
    assert job["status"] == "failed" and job["error"] == "RuntimeError: out of memory, say"
    assert job["overrides"] == ["strategy.head_lr=0.5"] and job["job"] == 0

    assert run_task(cfg, lambda _cfg: {"val/acc_best": 0.75, "test/acc": 0.5}) == 0.75
    job = json.loads((tmp_path / "0" / JOB_FILE).read_text())
    assert job["status"] == "ok" and job["metrics"] == {"val/acc_best": 0.75, "test/acc": 0.5}


def test_a_single_run_still_stops_on_errors(tmp_path):
    cfg = compose_config([], output_dir=tmp_path)

    def crash(_cfg):
        raise RuntimeError("boom")

    def bad_setting(_cfg):
        raise ConfigError("strategy.head_lr=-1: a learning rate must be positive.")

    with pytest.raises(RuntimeError, match="boom"):
        run_task(cfg, crash)
    with pytest.raises(SystemExit) as stop:
        run_task(cfg, bad_setting)
    assert stop.value.code == 2
    assert not (tmp_path / JOB_FILE).exists()


def test_the_sweep_table_script_rebuilds_the_table_of_an_unfinished_sweep(tmp_path):
    """Job 0 finished, job 1 is still running (no job.json yet)."""
    for number, overrides in enumerate((["lr=0.1", "seed=1"], ["lr=0.3", "seed=1"])):
        hydra_dir = tmp_path / str(number) / ".hydra"
        hydra_dir.mkdir(parents=True)
        (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (tmp_path / "0" / JOB_FILE).write_text(json.dumps(records((0, ["lr=0.1", "seed=1"], "ok", 0.8))[0]))
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "sweep_table.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Sweep summary: 2 jobs, 0 failed, 1 without a result" in result.stdout
    finished, running = read_sweep_table(tmp_path)
    assert (finished["best"], finished["overrides"], finished[METRIC]) == ("*", "lr=0.1", "0.8")
    assert running["status"].startswith("no result: no job.json: still running")
    assert running["overrides"] == "lr=0.3" and running["output_dir"] == str(tmp_path / "1")


@pytest.mark.parametrize("how", ["script", "module"])
def test_ddp_workers_of_a_multirun_job_rerun_the_command_the_user_ran(tmp_path, how):
    """A fork's own entry point, or a non-editable install (no train.py beside the package):
    the workers start the way this process was started, not a train.py next to the package."""
    probe = "import json\nfrom transfer_learning.run.sweeps import entry_command\n"
    probe += "print(json.dumps(entry_command()))\n"
    (tmp_path / "fork_train.py").write_text(probe)
    command = ["fork_train.py"] if how == "script" else ["-m", "fork_train"]
    result = subprocess.run([sys.executable, *command], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, check=True)  # fmt: skip
    started = json.loads(result.stdout.strip().splitlines()[-1])
    expected = [str(tmp_path / "fork_train.py")] if how == "script" else ["-m", "fork_train"]
    assert started == [sys.executable, *expected]


def test_sampled_values_are_shown_short_and_kept_exact_in_the_csv():
    from transfer_learning.results.sweep_table import short_numbers

    assert (
        short_numbers("strategy.head_lr=0.0031622776601683794 seed=3") == "strategy.head_lr=0.003162 seed=3"
    )
    assert short_numbers("x=1.2345678e-05 data.root=/d/v1.123456") == "x=1.235e-05 data.root=/d/v1.123456"
    assert (
        short_numbers("trainer.max_epochs=30 strategy.head_lr=0.1")
        == "trainer.max_epochs=30 strategy.head_lr=0.1"
    )


def test_the_first_job_hides_the_imported_libraries_from_the_collector_and_jobs_garbage_is_still_collected():
    code = """
import gc, weakref
from transfer_learning.run.sweeps import settle_imports
assert gc.get_freeze_count() == 0
settle_imports()
frozen = gc.get_freeze_count()
assert frozen > 10_000, frozen  # hydra, omegaconf and the standard library at least

class Node: pass
a, b = Node(), Node()
a.other, b.other = b, a  # a job's reference cycle
gone = weakref.ref(a)
del a, b
settle_imports()  # a second job of the same process freezes nothing more
assert gc.get_freeze_count() == frozen
gc.collect()
assert gone() is None
print("ok", frozen)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stdout + done.stderr
