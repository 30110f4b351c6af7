"""`python <script> args` for the tests, as a real process forked from one that has already
imported torch, Lightning and Hydra.

Each command line the suite runs used to start a fresh interpreter and spend about 4 s of its
10-15 s importing torch, torchvision, torchmetrics and Lightning. Here a multiprocessing
forkserver (one per pytest worker, started with the session) imports them once; every run is a
child forked from it, so it still has its own globals, signal handlers, environment, working
directory, stdout/stderr and exit code. The child is made a main process again (multiprocessing's
default start method, no parent), so the loader workers and DDP processes it starts are made
as a fresh interpreter would make them. ``run_python`` waits for the run; ``start_python``
does not (the part of ``subprocess.Popen`` the tests use: pid, poll, wait, send_signal,
communicate), and can put the run in a session of its own, so that tests send it and its
loader workers real signals. Tests that time start-up, run a fork's copy of the package, or
stand for a terminal's Ctrl-C start fresh interpreters.

``TL_TEST_SUBPROCESS=1`` runs every command in a fresh interpreter instead (to rule this runner
out when a test fails).
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

# Imported once by the forkserver: what every train/eval/predict/export run imports first
# (wandb's media folder, made at import, is left to the forkserver to delete: see _child).
PRELOAD = [
    "torch",
    "torchvision",
    "lightning",
    "torchmetrics",
    "hydra",
    "omegaconf",
    "timm",
    "wandb",
    "transfer_learning.cli.hydra_entry",
    "transfer_learning.pipelines.train",
    "transfer_learning.results.finish",
    "forkwarm",
]

_context: multiprocessing.context.ForkServerContext | None = None


def _forkserver() -> multiprocessing.context.ForkServerContext:
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        _context = context
        # The forkserver is a new interpreter that does not get this process's sys.path (Python
        # 3.11 drops it), and a preload module it cannot import is skipped without a word: it
        # finds this folder's modules (forkwarm) through PYTHONPATH, set only while it starts.
        before = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), before]))
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            if before is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = before
    return _context


def start_forkserver() -> None:
    """Start the forkserver now: it imports PRELOAD while the tests go on."""
    if os.environ.get("TL_TEST_SUBPROCESS") != "1":
        _forkserver()


def _child(argv: list[str], cwd: str, env: dict[str, str], out: str, err: str, new_session: bool) -> None:
    """The body of ``python argv...`` in the forked child; never returns."""
    if new_session:
        os.setsid()
    # A fresh interpreter's multiprocessing: this process is the main one, with no parent, and
    # its loader workers and DDP processes start the default way (a forkserver child would
    # otherwise start them through a second forkserver of its own).
    multiprocessing.current_process().name = "MainProcess"
    multiprocessing.process._parent_process = None  # type: ignore[attr-defined]
    multiprocessing.set_start_method(None, force=True)  # type: ignore[arg-type]
    # wandb made one temporary folder for its media when the forkserver imported it: the
    # forkserver deletes it when it exits, not the first child to finish.
    media = sys.modules.get("wandb.sdk.data_types._private")
    if media is not None:
        media.MEDIA_TMP._finalizer.detach()
        atexit.unregister(media.MEDIA_TMP.cleanup)
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.dup2(handle, fd)
        os.close(handle)
    os.environ.clear()
    os.environ.update(env)
    if env.get("OMP_NUM_THREADS", "").isdigit():  # what a fresh interpreter's torch reads at start-up
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    os.chdir(cwd)
    # What the interpreter does at start-up with PYTHONPATH and the script's folder.
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if argv[0] in ("-m", "-c"):
        sys.path[:0] = [cwd, *extra]
    else:
        sys.path[:0] = [str(Path(argv[0]).resolve().parent), *extra]
    code: int = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()  # a real interpreter runs them at exit (W&B finishes its run there)
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed or broken stream: nothing left to save
                stream.flush()
        os._exit(code)


class Started:
    """``python args...`` started in a forked child (or, with ``fresh`` or
    TL_TEST_SUBPROCESS=1, a fresh interpreter) and not waited for. stdout and stderr go to
    files: ``output`` for both when given (as ``stderr=subprocess.STDOUT`` would), else two
    files of a temporary folder."""

    def __init__(
        self,
        args: Sequence[str],
        cwd: str | Path,
        env: Mapping[str, str] | None = None,
        new_session: bool = False,
        output: Path | None = None,
        fresh: bool = False,
    ) -> None:
        env = dict(os.environ if env is None else env)
        self.args = [sys.executable, *map(str, args)]
        if output is None:
            self._folder = tempfile.TemporaryDirectory(prefix="forkrun")
            self._out, self._err = Path(self._folder.name) / "stdout", Path(self._folder.name) / "stderr"
        else:
            self._out = self._err = output
        for path in (self._out, self._err):
            path.write_bytes(b"")
        self.returncode: int | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        if fresh or os.environ.get("TL_TEST_SUBPROCESS") == "1":
            with self._out.open("ab") as out, self._err.open("ab") as err:
                self._popen = subprocess.Popen(
                    self.args, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=new_session
                )
            self.pid = self._popen.pid
        else:
            self._process = _forkserver().Process(
                target=_child,
                args=(self.args[1:], str(cwd), env, str(self._out), str(self._err), new_session),
            )
            self._process.start()
            assert self._process.pid is not None
            self.pid = self._process.pid

    def poll(self) -> int | None:
        if self.returncode is None:
            if self._popen is not None:
                self.returncode = self._popen.poll()
            else:
                assert self._process is not None
                self.returncode = self._process.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self._popen is not None:
            self._popen.wait(timeout)
        else:
            assert self._process is not None
            self._process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0, *self.outputs())
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.wait(60)

    def outputs(self) -> tuple[str, str]:
        """What the process has written so far to stdout and to stderr (the same text twice
        with ``output``)."""
        return tuple(  # type: ignore[return-value]
            p.read_text(encoding="utf-8", errors="replace") for p in (self._out, self._err)
        )

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the end (killing the process after ``timeout``, as the tests' callers
        expect of a hung run) and return its stdout and stderr."""
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        return self.outputs()


# ``subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, start_new_session=new_session,
# ...)`` with the output in files; ``fresh``: in a new interpreter.
start_python = Started


def run_python(
    args: Sequence[str],
    cwd: str | Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """What ``subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
    text=True, timeout=timeout)`` returns, with ``args[0]`` a script, ``-m`` or ``-c``."""
    process = start_python(args, cwd, env)
    out, err = process.communicate(timeout)
    return subprocess.CompletedProcess(process.args, process.wait(), out, err)
