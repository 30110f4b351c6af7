"""`trainer=multinode` as users start it: under torchrun (two "nodes" of one CPU process each,
on this machine) and through scripts/slurm/train_multinode.sbatch (SLURM's `srun` replaced by a
stand-in that starts one task per process with SLURM's variables; everything else is real)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, confusion_counts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_args(shapes_dir: Path) -> list[str]:
    return [
        "trainer.accelerator=cpu",
        "data=imagefolder",
        f"data.root={shapes_dir}",
        "input.image_size=48",
        "data.num_workers=0",
        "trainer.max_epochs=1",
        "logger=csv",
    ]


def check_two_process_run(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["batch size"] == "32 feature vectors per device x 2 devices = 64"
    counts = confusion_counts(run_dir)
    assert sum(map(sum, counts)) == int(summary["images train/val/test"].split("/")[2])
    return summary


def environment(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for var in [v for v in env if v.startswith(("SLURM_", "TORCHELASTIC_"))] + ["PROJECT_ROOT"]:
        env.pop(var, None)
    return {**env, **extra}


@pytest.mark.slow
def test_two_nodes_under_torchrun_train_into_one_folder(tmp_path, shapes_dir):
    port, run_dir = free_port(), tmp_path / "shared" / "run"
    torchrun = Path(sys.executable).parent / "torchrun"
    nodes = [
        subprocess.Popen(
            [
                str(torchrun),
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={rank}",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                str(REPO / "train.py"),
                "trainer=multinode",
                "trainer.devices=1",
                f"hydra.run.dir={run_dir}",
                *data_args(shapes_dir),
            ],
            cwd=tmp_path,
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    summary = check_two_process_run(run_dir)
    assert summary["batch size"].endswith("x 2 devices = 64")
    assert "Run summary" in outputs[0] and "Run summary" not in outputs[1]  # rank 0 reports
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]


SRUN_STAND_IN = """#!/bin/bash
# srun on a machine without SLURM: one task per process, with the variables srun sets.
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  per_node=$SLURM_NTASKS_PER_NODE
  SLURM_PROCID=$i SLURM_LOCALID=$((i % per_node)) SLURM_NODEID=$((i / per_node)) "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""


@pytest.mark.slow
def test_the_sbatch_example_runs_ddp_across_two_nodes(tmp_path, shapes_dir):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN_STAND_IN)
    (bin_dir / "srun").chmod(0o755)
    env = environment(
        SLURM_JOB_ID="4242", SLURM_JOB_NAME="transfer-learning", SLURM_SUBMIT_DIR=str(REPO),
        SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1",
        SLURM_NODELIST="127.0.0.1", MASTER_PORT=str(free_port()), PROJECT_ROOT=str(tmp_path),
    )  # fmt: skip
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "slurm" / "train_multinode.sbatch"), *data_args(shapes_dir)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "logs" / "train" / "slurm" / "4242"
    check_two_process_run(run_dir)
    assert result.stdout.count("Run summary") == 1
    output = result.stdout + result.stderr
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in output and "GLOBAL_RANK: 1, MEMBER: 2/2" in output
    assert not (REPO / "logs" / "train" / "slurm" / "4242").exists()  # outputs under PROJECT_ROOT
