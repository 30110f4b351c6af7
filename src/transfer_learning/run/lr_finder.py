"""`python train.py tune_lr=true`: Lightning's learning-rate finder before training, its plot in
the run folder, and its suggestion as the strategy's head learning rate.

Lightning's finder (its ``LearningRateFinder`` callback, run as ``Tuner.lr_find`` runs it) trains
for up to ``tune_lr_steps`` steps while it raises the learning rate of every param group
together, from ``MIN_LR`` to ``MAX_LR`` exponentially, records the smoothed training loss
(stopping once it is 4x its best), then puts the weights, optimizer, loops and random state back
as they were. The suggestion is the rate where the loss
falls fastest against log(lr), computed here from the recorded curve: Lightning 2.6's own
``suggestion()`` is biased towards the smallest rates (see :func:`unbiased` and
:func:`steepest_descent`).

The sweep has one rate for all groups; this template has several (backbone and head, one per
block with ``layer_decay``), so the suggestion becomes ``head_lr`` and every other rate the
strategy names in :attr:`~transfer_learning.model.strategies.Strategy.lr_names` is scaled by the
same factor: the configured ratios between the groups hold.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import LearningRateFinder
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from transfer_learning.errors import ConfigError
from transfer_learning.lightning_internals import end_fit_after_sweep, set_initial_hparam, set_sweep_steps
from transfer_learning.model.module import TransferLearningModule
from transfer_learning.model.strategies import Strategy
from transfer_learning.plotting import pyplot, save_figure
from transfer_learning.run.loggers import log_picture

# The sweep's range. Below 1e-6 nothing a head or a fine-tuned backbone learns shows in a few
# steps; by 1 the loss has long diverged (the finder stops when it is 4x its best).
MIN_LR, MAX_LR = 1e-6, 1.0
# tune_lr_steps below this leave too few points to find the steepest descent in.
MIN_STEPS = 10
# The sweep never takes more steps than the run trains, unless that is under this many.
MIN_SWEEP = 50
# The finder's loss smoothing (Lightning's _LRCallback: beta=0.98, which lr_find does not change).
SMOOTHING = 0.98
PLOT_NAME = "lr_finder.png"


def check_tune_lr(cfg: DictConfig) -> None:
    """Settings ``tune_lr=true`` cannot work with, refused before anything is built."""
    if not cfg.get("tune_lr"):
        return
    if cfg.get("ckpt_path"):
        raise ConfigError(
            f"tune_lr=true with ckpt_path={cfg.ckpt_path}: a resumed run keeps the learning rates it "
            "was started with (its optimizer state and schedule are in the checkpoint). Drop tune_lr to "
            "resume, or drop ckpt_path to start a new run with tuned rates."
        )
    steps = cfg.get("tune_lr_steps", 100)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < MIN_STEPS:
        raise ConfigError(
            f"tune_lr_steps={steps}: the learning-rate finder needs a whole number of {MIN_STEPS} or "
            "more training steps (default 100) to tell where the loss falls fastest."
        )


def tune_learning_rate(
    trainer: L.Trainer,
    module: TransferLearningModule,
    datamodule: L.LightningDataModule,
    output_dir: Path,
    loggers: Sequence[Logger],
    steps: int = 100,
) -> dict[str, str]:
    """Run Lightning's learning-rate finder for at most ``steps`` training steps and set the
    strategy's rates from its suggestion (``module.strategy`` and ``module.hparams["strategy"]``,
    which checkpoints keep), before ``trainer.fit`` builds the optimizer. The module's weights
    are left as they were. Rank zero saves the plot as ``output_dir/lr_finder.png`` and logs it.
    Returns the run summary's entries: ``lr finder`` (old -> new rates, or why they were kept)
    and ``lr finder plot``."""
    rates = _rates(module.strategy)
    if "head_lr" not in rates:
        raise ConfigError(
            f"tune_lr=true sets the head's learning rate, but strategy={module.strategy.name} has no "
            f"head_lr (its rates: {', '.join(rates) or 'none'})."
        )
    finder = _SizedFinder(steps)
    module.stop_on_nonfinite_loss = False  # the sweep runs until the loss diverges, by design
    try:
        lrs, losses = finder.sweep(trainer, module, datamodule)
    finally:
        module.stop_on_nonfinite_loss = True
    # Lightning skips 10 points at the start of a 100-step sweep (noise while the average forms)
    # and 1 at the end; a shorter sweep skips the same share, not half its range.
    skip_begin = max(1, round(len(lrs) / 10))
    if finder.optimal_lr is None:
        index, why = None, "Lightning skips the finder with trainer.fast_dev_run"
    else:
        index, why = steepest_descent(lrs, losses, skip_begin)
        if index is None and len(lrs) < finder.steps:
            why += f"; it stopped after {len(lrs)} of {finder.steps} steps, the loss diverging"
    suggestion = lrs[index] if index is not None else None

    new = dict(rates)
    if suggestion is not None:
        head = float(f"{suggestion:.1e}")  # the rate as printed: 3.2e-03, not 3.1622776e-03
        factor = head / rates["head_lr"]
        new = {name: float(f"{rate * factor:.12g}") for name, rate in rates.items()}
        new["head_lr"] = head
        _apply(module, new)

    plot: Path | None = None
    if trainer.is_global_zero:
        if any(math.isfinite(loss) for loss in losses):
            plot = _save_plot(
                lrs, losses, rates, new, index, skip_begin, finder.steps, module.strategy.name,
                output_dir / PLOT_NAME,
            )  # fmt: skip
            log_picture(loggers, "lr_finder/plot", plot)
        record = {"steps": len(lrs), "suggestion": new["head_lr"] if index is not None else None,
                  "configured": rates}  # fmt: skip
        for logger in loggers:
            logger.log_hyperparams({"lr_finder": record})
        where = f"; plot: {plot}" if plot else ""
        if suggestion is not None:
            was = f"was head_lr={rates['head_lr']:.1e}"
            print(f"LR finder: suggestion {new['head_lr']:.1e} ({was}){where}", flush=True)
        else:
            print(f"LR finder: no suggestion ({why}); keeping {_listed(rates)}{where}", flush=True)

    if suggestion is not None:
        outcome = ", ".join(f"{name} {rates[name]:.1e} -> {new[name]:.1e}" for name in rates)
    else:
        outcome = f"no suggestion ({why}); kept {_listed(rates)}"
    summary = {"lr finder": outcome}
    if plot is not None:
        summary["lr finder plot"] = str(plot)
    return summary


def _rates(strategy: Strategy) -> dict[str, float]:
    """The learning rates the strategy declares in ``lr_names`` (its own hook, not attribute names
    guessed from a pattern), head_lr first; a name that is unset (None) is left out."""
    found: dict[str, float] = {}
    for name in strategy.lr_names:
        value = getattr(strategy, name, None)
        if value is None:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(
                f"strategy={strategy.name} lists {name!r} in lr_names, but its value is {value!r}, "
                "not a learning rate: lr_names names the strategy's float learning-rate attributes."
            )
        found[name] = float(value)
    return dict(sorted(found.items(), key=lambda item: item[0] != "head_lr"))


def _apply(module: TransferLearningModule, rates: dict[str, float]) -> None:
    """The new rates on the strategy (``configure_optimizers`` reads them when fit starts) and in
    the saved hyperparameters: checkpoints record them, and the loggers, which Lightning hands
    the module's initial hyperparameters when fit starts, show the rates the run trained with."""
    strategy = module.strategy
    for name, rate in rates.items():
        setattr(strategy, name, rate)
    accepted = inspect.signature(type(strategy)).parameters
    config = dict(module.hparams["strategy"])
    config.update({name: rate for name, rate in rates.items() if name in config or name in accepted})
    module.hparams["strategy"] = config
    set_initial_hparam(module, "strategy", dict(config))


class _SizedFinder(LearningRateFinder):
    """Lightning's finder callback, as ``Tuner.lr_find`` runs it (a fit that ends when the sweep
    is done, the weights put back), sized when that fit starts and the run's length is known:
    at most ``requested`` steps, and no more than the run itself trains unless that is under
    ``MIN_SWEEP``. The sweep gets as many epochs as its steps need, however few batches an epoch
    has, and no validation (it reads the training loss only)."""

    def __init__(self, requested: int) -> None:
        super().__init__(min_lr=MIN_LR, max_lr=MAX_LR, num_training_steps=requested, update_attr=False)
        end_fit_after_sweep(self)  # as Tuner.lr_find: this fit ends with the sweep
        self.requested = requested
        self.steps = requested

    def sweep(
        self, trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule
    ) -> tuple[list[float], list[float]]:
        """Run the sweep; its learning rates and (correctly) smoothed losses."""
        loop = trainer.fit_loop
        saved = loop.max_epochs, trainer.check_val_every_n_epoch
        trainer.callbacks = [self, *trainer.callbacks]  # type: ignore[attr-defined]
        try:
            trainer.fit(module, datamodule=datamodule)
        finally:
            trainer.callbacks = [c for c in trainer.callbacks if c is not self]  # type: ignore[attr-defined]
            loop.max_epochs, trainer.check_val_every_n_epoch = saved
        if self.optimal_lr is None:
            return [], []
        results = self.optimal_lr.results
        return [float(lr) for lr in results["lr"]], unbiased(results["loss"])

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run = float(trainer.estimated_stepping_batches)  # optimizer steps of the configured run
        fits = max(MIN_SWEEP, int(run)) if math.isfinite(run) else self.requested
        self.steps = min(self.requested, fits)
        set_sweep_steps(self, self.steps)
        loop = trainer.fit_loop
        if loop.max_epochs is not None and 0 <= loop.max_epochs < self.steps:
            loop.max_epochs = self.steps  # every epoch has at least one optimizer step
        trainer.check_val_every_n_epoch = self.steps + 1
        if trainer.is_global_zero:
            capped = f" (the run trains {int(run)})" if self.steps < self.requested else ""
            print(
                f"LR finder: sweeping every param group from {MIN_LR:g} to {MAX_LR:g} over at most "
                f"{self.steps} steps{capped}; the weights are put back afterwards.",
                flush=True,
            )
        self.lr_find(trainer, pl_module)


def unbiased(losses: Sequence[float]) -> list[float]:
    """The finder's smoothed losses with the bias correction Lightning 2.6 gets one step wrong.

    Its ``_LRCallback`` keeps an exponential moving average (beta 0.98, starting at 0) and divides
    the average after step i (0-based) by ``1 - beta ** (global_step + 1)``, but the global step
    has already counted that step: it divides by ``1 - beta ** (i + 2)`` where ``1 - beta ** (i + 1)``
    is right, so the first point reads about half the loss and the curve rises over the first few
    dozen steps whatever the learning rate (see Lightning issue #14167). Exact for a sweep that
    starts at global step 0, as this one does; tests/test_tune_lr.py checks it against Lightning's
    callback."""
    beta = SMOOTHING
    return [float(loss) * (1 - beta ** (i + 2)) / (1 - beta ** (i + 1)) for i, loss in enumerate(losses)]


def steepest_descent(
    lrs: Sequence[float], losses: Sequence[float], skip_begin: int
) -> tuple[int | None, str]:
    """The index of the point where the loss falls fastest on its way down to its lowest point,
    against log10(lr), the axis the exponential sweep is evenly spaced on (Lightning 2.6's
    ``suggestion()`` differentiates against lr itself, which favours the smallest rates by orders
    of magnitude, Lightning issue #21141, and searches past the lowest point, into the noise of
    the divergence). The first ``skip_begin`` points and the last one are not considered. None,
    and why, when there is no such point."""
    usable = [i for i in range(skip_begin, len(lrs) - 1) if math.isfinite(losses[i])]
    if len(usable) < 3:
        return None, (
            f"only {len(usable)} usable loss values in {len(lrs)} steps, too few to find where the "
            "loss falls fastest (raise tune_lr_steps)"
        )
    lowest = min(usable, key=lambda i: losses[i])
    descent = [i for i in usable if i <= lowest]
    if len(descent) < 2:
        return None, f"the loss did not fall in the sweep (lowest at its start, lr {lrs[lowest]:.1e})"
    x = np.log10([lrs[i] for i in descent])
    slopes = np.gradient(np.array([losses[i] for i in descent]), x)
    return descent[int(np.argmin(slopes))], ""


def _listed(rates: dict[str, float]) -> str:
    return ", ".join(f"{name}={rate:.1e}" for name, rate in rates.items())


def _save_plot(
    lrs: list[float],
    losses: list[float],
    rates: dict[str, float],
    new: dict[str, float],
    index: int | None,
    skip_begin: int,
    steps: int,
    strategy: str,
    path: Path,
) -> Path:
    """Loss against learning rate (log scale), the suggestion and the configured head_lr marked."""
    plt = pyplot()

    points = [(lr, loss) for lr, loss in zip(lrs, losses, strict=True) if math.isfinite(loss)]
    fig, ax = plt.subplots(figsize=(8.5, 5.2), dpi=120)
    ax.plot([p[0] for p in points], [p[1] for p in points], color="tab:blue", lw=2, marker="o", ms=3,
            label="training loss (smoothed)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (the sweep gives every param group this one rate)", fontsize=11)
    ax.set_ylabel("training loss (exponentially smoothed)", fontsize=11)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)

    # The y range of the descent, not of the divergence at the end.
    values = sorted(p[1] for p in points)
    low = values[0]
    high = max(p[1] for p in points[: max(1, len(points) // 2)])
    pad = 0.08 * (high - low or abs(high) or 1.0)
    ax.set_ylim(low - pad, high + 2 * pad)

    ignored = lrs[min(skip_begin, len(lrs) - 1)]
    ax.axvspan(lrs[0], ignored, color="0.85", alpha=0.5, lw=0, label="not considered (first points)")
    configured = f"configured head_lr {rates['head_lr']:.1e}"
    ax.axvline(rates["head_lr"], color="0.35", ls=":", lw=1.8, label=configured)
    if index is not None:
        suggestion, y = lrs[index], losses[index]
        ax.axvline(suggestion, color="tab:red", ls="--", lw=1.5)
        ax.plot([suggestion], [y], "o", color="tab:red", ms=10, zorder=5,
                label=f"suggestion {new['head_lr']:.1e} (steepest descent)")  # fmt: skip
        ax.annotate(
            f"suggestion\n{new['head_lr']:.1e}", (suggestion, y), xytext=(12, 18), textcoords="offset points",
            color="tab:red", fontsize=11, fontweight="bold",
        )  # fmt: skip
    ax.legend(loc="lower left", fontsize=9, framealpha=0.9)

    done = f"{len(lrs)} steps" if len(lrs) >= steps else f"{len(lrs)} of {steps} steps (the loss diverged)"
    ax.set_title(f"Learning-rate finder: strategy={strategy}, {done}", fontsize=12)
    if index is not None:
        applied = ", ".join(f"{name} {rates[name]:.1e} \u2192 {new[name]:.1e}" for name in rates)
        note = f"applied: {applied}" + (" (ratios kept)" if len(rates) > 1 else "")
    else:
        note = f"no suggestion: kept {_listed(rates)}"
    fig.text(0.01, 0.005, note, fontsize=9, color="0.25", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return save_figure(fig, path, plt)
