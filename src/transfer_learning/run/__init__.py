"""Running: composing configs, the train loop, resume, sweeps, checkpoints, loggers."""
