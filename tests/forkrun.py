"""`python <script> args` for the tests, as a real process forked from one that has already
imported torch, Lightning and Hydra.

Each command line the suite runs used to start a fresh interpreter and spend about 4 s of its
10-15 s importing torch, torchvision, torchmetrics and Lightning. Here a multiprocessing
forkserver imports them once per test session; every run is a child forked from it, so it still
has its own globals, signal handlers, environment, working directory, stdout/stderr and exit
code, and DDP or loader workers it starts are real processes too. What a fork cannot share is
left to a real interpreter: tests that signal a process or measure its start-up call
``subprocess`` themselves.

``TL_TEST_SUBPROCESS=1`` runs every command in a fresh interpreter instead (to rule this runner
out when a test fails).
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

# Imported once by the forkserver: what every train/eval/predict/export run imports first.
PRELOAD = [
    "torch",
    "torchvision",
    "lightning",
    "torchmetrics",
    "hydra",
    "omegaconf",
    "transfer_learning.cli.hydra_entry",
    "transfer_learning.run.train",
]

_context: multiprocessing.context.ForkServerContext | None = None


def _forkserver() -> multiprocessing.context.ForkServerContext:
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        _context = context
    return _context


def _child(argv: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """The body of ``python argv...`` in the forked child; never returns."""
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    os.environ.clear()
    os.environ.update(env)
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


def run_python(
    args: Sequence[str],
    cwd: str | Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """What ``subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
    text=True, timeout=timeout)`` returns, with ``args[0]`` a script, ``-m`` or ``-c``."""
    env = dict(os.environ if env is None else env)
    command = [sys.executable, *map(str, args)]
    if os.environ.get("TL_TEST_SUBPROCESS") == "1":
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="forkrun") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        out.touch()
        err.touch()
        process = _forkserver().Process(
            target=_child, args=(list(map(str, args)), str(cwd), env, str(out), str(err))
        )
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(command, timeout, out.read_bytes(), err.read_bytes())
        code = process.exitcode
        assert code is not None
        return subprocess.CompletedProcess(
            command,
            code,
            out.read_text(encoding="utf-8", errors="replace"),
            err.read_text(encoding="utf-8", errors="replace"),
        )
