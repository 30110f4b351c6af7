"""W&B never prompts or hangs: offline unless a login is at hand or WANDB_MODE says otherwise."""

from __future__ import annotations

import pytest

from transfer_learning.run.loggers import wandb_logged_in, wandb_logger, wandb_mode


@pytest.fixture
def no_wandb_setup(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    return tmp_path


def test_offline_without_login(no_wandb_setup):
    assert not wandb_logged_in()
    assert wandb_mode() == "offline"


def test_online_with_an_api_key_or_a_netrc_entry(no_wandb_setup, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    netrc = no_wandb_setup / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "y" * 40 + "\n")
    netrc.chmod(0o600)
    assert wandb_mode() == "online"


def test_wandb_mode_variable_wins(no_wandb_setup, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_offline_logger_writes_a_local_run_without_network(no_wandb_setup):
    logger = wandb_logger(project="tests", save_dir=str(no_wandb_setup / "out"), name="offline-check")
    try:
        logger.log_metrics({"val/acc": 0.5}, step=0)
        run_dir = logger.experiment.dir
        assert "offline-run-" in run_dir and run_dir.startswith(str(no_wandb_setup / "out"))
    finally:
        import wandb

        wandb.finish()
    assert list((no_wandb_setup / "out" / "wandb").glob("offline-run-*/*.wandb"))
