"""Every use of another library's private state, in one place: Lightning's (a few: torch's, torchvision's).

The lowest layer of the package: it imports only the standard library, torch, Lightning, Hydra
and :mod:`transfer_learning.errors`, so that ``model/``, ``data/``, ``run/`` and ``scripts/``
can all use it. Each function stands in for one behaviour that no public API offers; its
comment says which, why nothing public does it, and the version it was checked with. Where the
private attribute is gone or means something else, the function raises
:class:`LightningInternalsChanged` (naming the attribute, the version checked and what to do)
instead of quietly doing nothing; the two whose callers always tolerated absence
(:func:`fit_batch_iterator`, :func:`weights_metrics`) keep doing so.
``tests/test_lightning_internals.py`` checks each against the installed versions with a real
``lightning.Trainer``, and that nothing else in ``src/`` or ``scripts/`` uses these names.

:mod:`.training` holds the trainer's, its loops', DDP's, the LR finder's and weight averaging's;
:mod:`.loggers` the W&B and CSV loggers'; :mod:`.torch_state` torch's and torchvision's.
"""

from __future__ import annotations

from transfer_learning.lightning_internals.checked import (
    CHECKED,
    LightningInternalsChanged,
    changed,
)
from transfer_learning.lightning_internals.loggers import (
    CSV_EXPERIMENT_REASON,
    KEPT_METRICS_REASON,
    WANDB_INIT_REASON,
    KeptMetricsWriter,
    csv_experiment,
    wandb_init_kwargs,
)
from transfer_learning.lightning_internals.torch_state import (
    NORM_BASE_REASON,
    WEIGHTS_METRICS_REASON,
    keeps_running_stats,
    weights_metrics,
)
from transfer_learning.lightning_internals.training import (
    AVERAGE_MODEL_REASON,
    DATA_FETCHER_REASON,
    DDP_KWARGS_REASON,
    EARLY_EXIT_REASON,
    HPARAMS_INITIAL_REASON,
    LOGGING_STEP_REASON,
    SIGTERM_FLAG_REASON,
    SWEEP_STEPS_REASON,
    WORKER_COMMAND_REASON,
    averaged_model,
    ddp_kwargs,
    ddp_worker_command,
    end_fit_after_sweep,
    fit_batch_iterator,
    set_initial_hparam,
    set_received_sigterm,
    set_sweep_steps,
    uncount_logging_step,
)

__all__ = [
    "AVERAGE_MODEL_REASON",
    "CHECKED",
    "CSV_EXPERIMENT_REASON",
    "DATA_FETCHER_REASON",
    "DDP_KWARGS_REASON",
    "EARLY_EXIT_REASON",
    "HPARAMS_INITIAL_REASON",
    "KEPT_METRICS_REASON",
    "LOGGING_STEP_REASON",
    "NORM_BASE_REASON",
    "SIGTERM_FLAG_REASON",
    "SWEEP_STEPS_REASON",
    "WANDB_INIT_REASON",
    "WEIGHTS_METRICS_REASON",
    "WORKER_COMMAND_REASON",
    "KeptMetricsWriter",
    "LightningInternalsChanged",
    "averaged_model",
    "changed",
    "csv_experiment",
    "ddp_kwargs",
    "ddp_worker_command",
    "end_fit_after_sweep",
    "fit_batch_iterator",
    "keeps_running_stats",
    "set_initial_hparam",
    "set_received_sigterm",
    "set_sweep_steps",
    "uncount_logging_step",
    "wandb_init_kwargs",
    "weights_metrics",
]
