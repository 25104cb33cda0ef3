"""``varctl`` in a process of its own, forked from a server that imported torch, Lightning and varctl once.

The fault tests signal, kill and read whole runs, so each needs a process of its own; started with
``python -m varctl``, each paid the imports again (torch, Lightning and the torchmetrics, torchvision,
transformers and scipy modules Lightning pulls in: about 10 s of a 2-core machine's time per start).
multiprocessing's forkserver imports them once, before any thread pool starts, and forks a child per run:
a real process with its own pid, signals, exit status (143 after a SIGTERM, -9 when killed), environment,
working directory and output, like ``subprocess.Popen`` gives. What a fork skips is the interpreter's start
and what it prints then; tests/test_cli.py starts ``python -m varctl`` for real."""

from __future__ import annotations

import atexit
import io
import multiprocessing
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

# what a run imports before its first step (the modules `varctl.cli.main.run` imports when it runs)
PRELOAD = [
    "torch", "lightning", "varctl.cli.main", "varctl.cli.config", "varctl.lit.var", "varctl.lit.control",
]  # fmt: skip
_context = None


def _server():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _run(argv: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    """The child: ``python -m varctl *argv`` with `env` and `cwd`, its output into the files `out`, `err`."""
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # read TMPDIR again
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(file, fd)
        os.close(file)
    sys.path[:0] = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.argv = [str(Path(__file__).resolve().parents[1] / "varctl" / "__main__.py"), *argv]
    code = 1
    try:
        from varctl.cli import main

        code = main(argv)
    except SystemExit as e:
        code = e.code
    except BaseException:
        traceback.print_exc()
    finally:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code)


class Forked:
    """What the tests use of ``subprocess.Popen(..., text=True, stdout=PIPE, stderr=PIPE)``."""

    def __init__(self, argv: list[str], env: dict, cwd: str | os.PathLike):
        self.args = ["varctl", *argv]
        self._dir = tempfile.TemporaryDirectory(prefix="varctl-forked-")
        self._out, self._err = (os.path.join(self._dir.name, name) for name in ("stdout", "stderr"))
        self._process = _server().Process(target=_run, args=(argv, dict(env), str(cwd), self._out, self._err))
        self._process.start()
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def _read(self, path: str) -> str:
        return Path(path).read_text() if os.path.exists(path) else ""

    @property
    def stderr(self) -> io.StringIO:
        """What the process wrote to its stderr so far (``proc.stderr.read()``, as from Popen's pipe)."""
        return io.StringIO(self._read(self._err))

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.join()
            raise
        return self._read(self._out), self._read(self._err)


def varctl(*argv: str, env: dict | None = None, cwd: str | os.PathLike = ".") -> Forked:
    """Start ``python -m varctl *argv`` in a forked process; ``env`` is its whole environment."""
    return Forked(list(argv), os.environ if env is None else env, cwd)
