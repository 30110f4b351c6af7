"""Errors a user can cause. The CLI prints them as one message, without a traceback."""


class TransferLearningError(Exception):
    """Base class: a mistake in the data, the config or the weights, with the fix in the message."""


class ConfigError(TransferLearningError, ValueError):
    """A setting has a value that cannot work (unknown model, bad size, typo in a name)."""


class DataError(TransferLearningError, ValueError):
    """The image folder is missing, empty, inconsistent or holds unreadable files."""


class WeightsError(TransferLearningError, RuntimeError):
    """Pretrained weights cannot be found, downloaded or loaded into the chosen model."""


class CheckpointError(TransferLearningError, RuntimeError):
    """A checkpoint file that is missing, damaged, unsafe or made for another model."""


def find_user_error(exc: BaseException) -> TransferLearningError | None:
    """The user's mistake behind ``exc``, also when Hydra's instantiate wrapped it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, TransferLearningError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def user_message(error: TransferLearningError) -> str:
    """The error's message without the worker traceback a DataLoader wraps around it."""
    text = str(error)
    if "Original Traceback" in text:  # raised in a loader worker: the message is the last line
        last = text.rstrip().splitlines()[-1]
        name, _, rest = last.partition(": ")
        text = rest if rest and name.rsplit(".", 1)[-1] == type(error).__name__ else last
    return text


def byte_size(n: float) -> str:
    """A file or disk size as people read it (``1.5 GiB``), for messages about disk space."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


class RunFinished(Exception):
    """``ckpt_path=`` names a run whose training and test have finished: nothing to continue.
    Not an error (exit code 0); the message says where its results are and how to train longer."""


def count(n: int, noun: str) -> str:
    """``1 epoch``, ``3 epochs``: a number and its noun, for messages and printed tables."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
