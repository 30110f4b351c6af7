"""The private Lightning (and torch, torchvision) state in transfer_learning.lightning_internals,
checked against the installed versions: each test runs a real ``lightning.Trainer`` (tiny model,
tiny tensors, CPU) and looks at the attribute where the template uses it. A failure here means
the installed Lightning changed what the template relies on: update lightning_internals/ (the
message quotes why the template needs it). The last test keeps those names out of the rest of
src/ and scripts/."""

from __future__ import annotations

import csv
import re
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, LearningRateFinder
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from transfer_learning import lightning_internals as internals

ROOT = Path(__file__).resolve().parents[1]


class Tiny(L.LightningModule):
    """A linear layer (and, with ``norm``, a BatchNorm) on 4 features; records the batches it trains on."""

    def __init__(self, norm: bool = False, lr: float = 0.1, **hparams: Any) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2)) if norm else nn.Linear(4, 2)
        self.lr = lr
        self.seen: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, index = batch
        self.seen += [int(i) for i in index]
        loss = nn.functional.cross_entropy(self.layer(x), y)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y, _ = batch
        self.log("val_loss", nn.functional.cross_entropy(self.layer(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader(n: int = 8, batch_size: int = 1) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=generator)
    data = TensorDataset(x, (x[:, 0] > 0).long(), torch.arange(n))
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    settings: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_steps=3, enable_progress_bar=False, logger=False,
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )  # fmt: skip
    return L.Trainer(**{**settings, **kwargs})


# -- SIGTERM ----------------------------------------------------------------------------------


def test_received_sigterm_is_the_flag_lightnings_loops_read(tmp_path: Path) -> None:
    """Cleared during a validation it lets the validation finish; set after it, training stops."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    why = internals.SIGTERM_FLAG_REASON
    seen: list[int] = []

    class Signal(Callback):
        def on_validation_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            if not seen:  # as Lightning's SIGTERM handler: the loops stop at their next check
                internals.set_received_sigterm(trainer, True)
                assert trainer.received_sigterm is True, why

        def on_validation_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                                    batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
            seen.append(batch_idx)
            internals.set_received_sigterm(trainer, False)  # SaveOnPreemption: finish the validation
            assert trainer.received_sigterm is False, why

        def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
            internals.set_received_sigterm(trainer, True)  # SaveOnPreemption: training stops next

    fit = trainer(tmp_path, callbacks=[Signal()], max_steps=8, val_check_interval=2, limit_val_batches=3)
    module = Tiny()
    with pytest.raises(SIGTERMException):
        fit.fit(module, loader(), loader(3))
    assert seen == [0, 1, 2], f"the validation did not finish after the flag was cleared: {why}"
    assert fit.global_step == 2, f"training did not stop after the validation that set the flag: {why}"


# -- exact resumes ------------------------------------------------------------------------------


def test_the_fit_batch_iterator_is_what_the_epoch_trains_on(tmp_path: Path) -> None:
    """Batches drawn from it when training starts are batches the first epoch does not train on;
    trainer.train_dataloader (public) is set together with it."""
    why = internals.DATA_FETCHER_REASON
    found: dict[str, Any] = {}

    class Draw(Callback):
        def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
            assert hasattr(trainer.fit_loop, "_data_fetcher"), why
            found["fit_start"] = (trainer.train_dataloader, internals.fit_batch_iterator(trainer))

        def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
            iterator = internals.fit_batch_iterator(trainer)
            found["train_start"] = (trainer.train_dataloader, iterator)
            assert iterator is not None, f"no iterator where RandomState replays a resumed epoch: {why}"
            for _ in range(2):
                next(iterator)

    module = Tiny()
    trainer(tmp_path, callbacks=[Draw()], max_steps=4).fit(module, loader())
    assert found["fit_start"] == (None, None), f"made before the fit sets its data up: {why}"
    assert found["train_start"][0] is not None, "trainer.train_dataloader is not set with the iterator"
    assert module.seen == [2, 3, 4, 5], f"the epoch did not go on from the iterator drawn from: {why}"


def test_the_logging_step_is_the_checkpoints_batches_that_stepped(tmp_path: Path) -> None:
    """One step fewer in a saved checkpoint is one step fewer where the resumed run logs."""
    why = internals.LOGGING_STEP_REASON
    saved: dict[str, int] = {}

    class Uncount(Callback):
        def on_save_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
            state = checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]
            saved["before"] = state.get("_batches_that_stepped", -1)
            internals.uncount_logging_step(checkpoint)

    fit = trainer(tmp_path, callbacks=[Uncount()])
    fit.fit(Tiny(), loader())
    fit.save_checkpoint(tmp_path / "a.ckpt")
    assert saved["before"] == 3, f"not the count of steps logged (3): {why}"

    resumed: dict[str, int] = {}

    class Look(Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
            resumed["step"] = trainer.fit_loop.epoch_loop._batches_that_stepped

    trainer(tmp_path, callbacks=[Look()], max_steps=4).fit(Tiny(), loader(), ckpt_path=tmp_path / "a.ckpt")
    assert resumed["step"] == 2, f"the resumed run does not log from the checkpoint's count: {why}"


# -- DDP ------------------------------------------------------------------------------------------


def test_ddp_kwargs_are_what_distributed_data_parallel_is_made_with(tmp_path: Path, monkeypatch) -> None:
    """Set in LightningModule.setup, find_unused_parameters reaches the DistributedDataParallel."""
    import socket

    import torch.distributed as dist
    from lightning.pytorch.strategies import DDPStrategy
    from torch.nn.parallel import DistributedDataParallel

    why = internals.DDP_KWARGS_REASON
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": "0",
                        "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)  # put back after the test (the launcher sets them)
    wrapped: dict[str, Any] = {}

    class Module(Tiny):
        def setup(self, stage: str) -> None:
            kwargs = internals.ddp_kwargs(self.trainer.strategy)
            assert "find_unused_parameters" not in kwargs, why
            kwargs["find_unused_parameters"] = True

        def on_train_start(self) -> None:
            model = self.trainer.strategy.model
            wrapped["ddp"] = isinstance(model, DistributedDataParallel)
            wrapped["find_unused"] = getattr(model, "find_unused_parameters", None)

    try:
        fit = trainer(tmp_path, strategy=DDPStrategy(process_group_backend="gloo"), max_steps=1)
        fit.fit(Module(), loader())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert wrapped == {"ddp": True, "find_unused": True}, f"not what DDP was made with: {why}"


# -- the learning-rate finder ----------------------------------------------------------------


class Recorder(Logger):
    """A logger that keeps the hyperparameters Lightning gives it."""

    def __init__(self) -> None:
        super().__init__()
        self.hparams: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.hparams.append(dict(params))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass


def test_initial_hparams_set_after_init_are_what_loggers_get(tmp_path: Path) -> None:
    why = internals.HPARAMS_INITIAL_REASON
    module = Tiny(strategy={"head_lr": 0.1})
    internals.set_initial_hparam(module, "strategy", {"head_lr": 0.5})
    internals.set_initial_hparam(module, "not_saved", 1)  # nothing saved under it: nothing done
    assert "not_saved" not in module.hparams_initial
    logger = Recorder()
    trainer(tmp_path, logger=logger, max_steps=1).fit(module, loader())
    assert logger.hparams and logger.hparams[0]["strategy"] == {"head_lr": 0.5}, why


class Finder(LearningRateFinder):
    """The LR finder as run/lr_finder.py runs it: the fit ends with the sweep, sized when it starts."""

    def __init__(self, steps: int) -> None:
        super().__init__(min_lr=1e-4, max_lr=1e-2, num_training_steps=50, early_stop_threshold=None,
                         update_attr=False)  # fmt: skip
        internals.end_fit_after_sweep(self)
        self.steps = steps

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        internals.set_sweep_steps(self, self.steps)
        self.lr_find(trainer, pl_module)


def sweep(tmp_path: Path) -> tuple[Finder, Tiny, L.Trainer]:
    finder, module = Finder(steps=5), Tiny()
    fit = trainer(tmp_path, callbacks=[finder], max_steps=100)
    fit.fit(module, loader(64))
    return finder, module, fit


def test_early_exit_ends_the_fit_with_the_sweep(tmp_path: Path) -> None:
    from lightning.pytorch.trainer.states import TrainerStatus

    why = internals.EARLY_EXIT_REASON
    _, module, fit = sweep(tmp_path)
    assert len(module.seen) == 5, f"{len(module.seen)} training steps for a 5-step sweep: {why}"
    assert fit.state.status == TrainerStatus.FINISHED, why


def test_sweep_steps_are_the_steps_the_finder_sweeps(tmp_path: Path) -> None:
    why = internals.SWEEP_STEPS_REASON
    finder, _, _ = sweep(tmp_path)
    assert finder.optimal_lr is not None, why
    assert len(finder.optimal_lr.results["lr"]) == 5, f"set to 5 steps when the fit started: {why}"


# -- DDP workers in a multirun job --------------------------------------------------------------


def test_ddp_worker_command_is_what_lightning_starts_workers_with(monkeypatch) -> None:
    """Lightning's own launcher, under Hydra, starts its workers with the command given (no
    process is started: Popen is replaced)."""
    from hydra.core.hydra_config import HydraConfig
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.strategies.launchers import subprocess_script

    why = internals.WORKER_COMMAND_REASON
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555", "NODE_RANK": "0",
                        "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)  # put back after the test (the launcher sets them)
    started: list[tuple[list[str], str | None]] = []

    class Popen:
        def __init__(self, command: list[str], env: dict[str, str], cwd: str | None = None) -> None:
            started.append((list(command), cwd))

    monkeypatch.setattr(subprocess, "Popen", Popen)
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    original = subprocess_script._hydra_subprocess_cmd
    launcher = subprocess_script._SubprocessScriptLauncher(
        LightningEnvironment(), num_processes=3, num_nodes=1
    )
    with internals.ddp_worker_command(lambda rank: (["worker", str(rank)], "/job")):
        launcher._call_children_scripts()
    assert started == [(["worker", "1"], "/job"), (["worker", "2"], "/job")], why
    assert subprocess_script._hydra_subprocess_cmd is original, "not put back after the block"


# -- freeze_norm_stats ----------------------------------------------------------------------------


def test_norm_base_is_every_layer_with_running_statistics(tmp_path: Path) -> None:
    """Put in eval mode by a module's train() (as Network.train does, called when it freezes), they
    keep their statistics through a fit while everything else trains."""
    why = internals.NORM_BASE_REASON
    stats = [
        nn.BatchNorm1d(2),
        nn.BatchNorm2d(2),
        nn.SyncBatchNorm(2),
        nn.InstanceNorm2d(2),
        nn.LazyBatchNorm2d(),
    ]
    assert all(internals.keeps_running_stats(m) for m in stats), why
    assert not any(internals.keeps_running_stats(m) for m in (nn.LayerNorm(2), nn.GroupNorm(1, 2))), why

    class Frozen(Tiny):
        def train(self, mode: bool = True) -> Frozen:
            super().train(mode)
            for m in self.modules():
                if mode and internals.keeps_running_stats(m):
                    m.eval()
            return self

    module = Frozen(norm=True).train()
    weight = module.layer[1].weight.detach().clone()
    trainer(tmp_path).fit(module, loader(batch_size=4))
    norm = module.layer[0]
    assert int(norm.num_batches_tracked) == 0 and torch.equal(norm.running_mean, torch.zeros(4)), why
    assert not torch.equal(module.layer[1].weight, weight), "the rest did not train"


# -- weight averaging ---------------------------------------------------------------------------


def test_averaged_model_is_what_weight_averaging_averages_into(tmp_path: Path) -> None:
    from torch.optim.swa_utils import AveragedModel

    why = internals.AVERAGE_MODEL_REASON
    calls: list[int] = []

    def average(averaged: torch.Tensor, current: torch.Tensor, count: Any) -> torch.Tensor:
        calls.append(1)
        return current

    class EMA(EMAWeightAveraging):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            model = internals.averaged_model(self)  # as run/averaging.py's EMA, once the decay is known
            assert isinstance(model, AveragedModel), why
            model.avg_fn = average
            super().on_train_start(trainer, pl_module)

    trainer(tmp_path, callbacks=[EMA()]).fit(Tiny(), loader())
    assert calls, f"the avg_fn set on it was never called: {why}"


# -- loggers ------------------------------------------------------------------------------------


def test_wandb_init_kwargs_are_what_wandb_init_is_called_with(tmp_path: Path, monkeypatch) -> None:
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    why = internals.WANDB_INIT_REASON
    monkeypatch.setattr(wandb, "run", None)
    called: list[dict[str, Any]] = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: called.append(kwargs) or object())
    logger = WandbLogger(project="tests", save_dir=str(tmp_path), offline=True)
    kwargs = internals.wandb_init_kwargs(logger)
    assert "anonymous" in kwargs and kwargs["anonymous"] is None, f"anonymous=None no longer added: {why}"
    kwargs.pop("anonymous")  # as run/loggers.py does
    logger.experiment  # noqa: B018 (starts the run)
    assert called == [kwargs] and "anonymous" not in called[0], why


class KeptWriter(internals.KeptMetricsWriter):
    continued: list[str] = []

    def continue_file(self, path: str) -> None:
        type(self).continued.append(path)
        with open(path, newline="") as f:
            self.metrics_keys = next(csv.reader(f))


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class KeptCSVLogger(CSVLogger):
    @property
    def experiment(self) -> Any:
        return internals.csv_experiment(self, KeptWriter)


def test_csv_experiment_is_the_writer_csv_logger_logs_with(tmp_path: Path) -> None:
    why = internals.CSV_EXPERIMENT_REASON
    logger = KeptCSVLogger(tmp_path, name="csv", version=0)
    trainer(tmp_path, logger=logger, log_every_n_steps=1).fit(Tiny(), loader())
    assert isinstance(logger.experiment, KeptWriter) and logger.experiment is logger.experiment, why
    rows = read_rows(Path(logger.log_dir) / "metrics.csv")
    assert [r["step"] for r in rows] == ["0", "1", "2"], f"the writer made is not what logs: {why}"


def test_an_existing_metrics_file_is_kept_by_the_writer(tmp_path: Path) -> None:
    """A second fit in the same log folder continues metrics.csv (Lightning's writer deletes it)."""
    why = internals.KEPT_METRICS_REASON
    KeptWriter.continued.clear()
    for max_steps in (2, 4):
        logger = KeptCSVLogger(tmp_path, name="csv", version=0)
        fit = trainer(tmp_path, logger=logger, log_every_n_steps=1, max_steps=max_steps)
        fit.fit(Tiny(), loader())
    path = Path(logger.log_dir) / "metrics.csv"
    assert KeptWriter.continued == [str(path)], f"continue_file was not called for the existing file: {why}"
    rows = read_rows(path)
    assert [r["step"] for r in rows] == ["0", "1", "0", "1", "2", "3"], (
        f"the first fit's rows are gone: {why}"
    )


# -- torchvision ------------------------------------------------------------------------------


def test_weights_metrics_hold_the_imagenet_accuracy() -> None:
    from torchvision.models import ResNet18_Weights

    why = internals.WEIGHTS_METRICS_REASON
    table = internals.weights_metrics(ResNet18_Weights.IMAGENET1K_V1.meta)
    assert isinstance(table.get("ImageNet-1K", {}).get("acc@1"), float), why
    assert internals.weights_metrics({}) == {}


# -- nowhere else ---------------------------------------------------------------------------------

# The private names lightning_internals/ stands in for, and a few patterns that would be new ones.
PRIVATE = [
    r"\b_signal_connector\b", r"\b_combined_loader\b", r"\b_data_fetcher\b", r"\b_batches_that_stepped\b",
    r"\b_ddp_kwargs\b", r"\b_hparams_initial\b", r"\b_early_exit\b", r"\b_num_training_steps\b",
    r"\b_hydra_subprocess_cmd\b", r"\b_NormBase\b", r"\b_get_node\b", r"\b_average_model\b",
    r"\b_wandb_init\b", r"\b_check_log_dir_exists\b", r"[\"']_metrics[\"']", r"\._experiment\b",
    r"\._fs\b", r"\._trainer\b",
    r"\b(trainer|fit_loop|epoch_loop|strategy|trainer_strategy|pl_module)\._[A-Za-z]", r"\btorch\._[A-Za-z]",
    r"\bhydra\._", r"\b_internal\b",
]  # fmt: skip
# The project's own attributes of the same name (not a library's).
OWN = {("src/transfer_learning/run/random_state.py", r"\._trainer\b"): "RandomState's own trainer reference"}


def test_no_other_file_uses_these_private_names() -> None:
    found = []
    for path in sorted([*(ROOT / "src").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")]):
        name = path.relative_to(ROOT).as_posix()
        if name.startswith("src/transfer_learning/lightning_internals/"):
            continue
        text = path.read_text(encoding="utf-8")
        for pattern in PRIVATE:
            if (name, pattern) in OWN:
                continue
            for match in re.finditer(pattern, text):
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{name}:{line}: {match.group()}")
    assert not found, (
        "private Lightning/torch state used outside src/transfer_learning/lightning_internals/ (add a "
        "function there, with its reason, and a test here): " + ", ".join(found)
    )
