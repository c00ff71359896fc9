"""`pld ARGS` in a forked child of the test process: a real process (its own pid, exit status, signals, file
descriptors and environment) without a fresh interpreter's ~10 s of CPU importing torch, torchvision and timm.

For the tests that need a process to kill, interrupt or run beside another (kill points, Ctrl-C, workers sharing
a cache, torchrun's ranks, a Ray driver): the command runs as `python -m pld_pipeline ARGS` would, after the child
drops what pytest installed in this process (captured streams, warning capture, log handlers, hooks). The
command-line package is imported afresh in the child, so its consoles see the child's streams and terminal, and
the Hugging Face client reads its environment again (it reads it at import); the library stays imported, as it
would be after the command's own imports. Tests about imports (what a command loads, a teacher's code being
absent) start a fresh interpreter instead.
"""
from __future__ import annotations

import faulthandler
import importlib
import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from typing import IO, Any, Callable, Mapping, Sequence

PIPE, STDOUT, DEVNULL = subprocess.PIPE, subprocess.STDOUT, subprocess.DEVNULL


class Forked:
    """The forked command, driven like :class:`subprocess.Popen` (text streams)."""

    def __init__(self, args: Sequence[Any], env: Mapping[str, str] | None = None, stdin: Any = DEVNULL,
                 stdout: Any = None, stderr: Any = None, terminal: int | None = None, cwd: str | None = None,
                 target: Callable[[], Any] | None = None) -> None:
        """``stdout``/``stderr``: PIPE, DEVNULL, STDOUT (stderr only), a file object or descriptor, or None (this
        process's). ``terminal``: a pseudo-terminal's follower descriptor, made the child's controlling terminal
        and its three standard streams (as a shell starts a command). ``target``: a function the child runs
        instead of the command line (a `python -c` script); ``args`` then only names it."""
        if stdin is PIPE:
            raise ValueError("stdin=PIPE is not supported: pass a file or descriptor")
        self.args = [str(a) for a in args]
        self.returncode: int | None = None
        self.stdout: IO[str] | None = None
        self.stderr: IO[str] | None = None
        env = dict(os.environ if env is None else env)
        ours, theirs = [], []  # pipe ends to close in the child / in this process after the fork

        def stream(spec: Any, write: bool) -> int | None:
            if spec is PIPE:
                r, w = os.pipe()
                ours.append(r if write else w)
                theirs.append(w if write else r)
                return w if write else r
            if spec is DEVNULL:
                fd = os.open(os.devnull, os.O_RDWR)
                theirs.append(fd)
                return fd
            if spec is None:
                return None
            return spec if isinstance(spec, int) else spec.fileno()

        fds = [terminal, terminal, terminal] if terminal is not None else [
            stream(stdin, False), stream(stdout, True), None]
        if terminal is None:
            fds[2] = fds[1] if stderr is STDOUT else stream(stderr, True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._rss_at_fork = _rss_kib()
        self.peak_rss_kib: int | None = None  # the child's own peak resident set, less what it shared at the fork
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                for fd in ours:
                    os.close(fd)
                if cwd is not None:
                    os.chdir(cwd)
                code = _run_command(self.args, env, fds, terminal is not None, target)
            except BaseException:  # noqa: BLE001 - nothing may escape into the test process's code
                traceback.print_exc()
            finally:
                os._exit(code)
        self.pid = pid
        for fd in theirs:
            os.close(fd)
        pipes = iter(ours)
        if stdout is PIPE and terminal is None:
            self.stdout = open(next(pipes), encoding="utf-8", errors="replace")
        if stderr is PIPE and terminal is None:
            self.stderr = open(next(pipes), encoding="utf-8", errors="replace")

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                # a forked child starts with this process's resident pages (its high-water mark too)
                self.peak_rss_kib = max(0, usage.ru_maxrss - self._rss_at_fork)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Blocks until the child ends; ``timeout`` is only a guard against a hang (as for subprocess)."""
        guard = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if guard is not None and time.monotonic() > guard:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str | None, str | None]:
        """Both pipes drained side by side (a child filling one pipe while this reads the other would hang)."""
        texts: dict[str, str] = {}

        def drain(name: str, stream: IO[str]) -> None:
            texts[name] = stream.read()
            stream.close()
        readers = [threading.Thread(target=drain, args=(n, s), daemon=True)
                   for n, s in (("out", self.stdout), ("err", self.stderr)) if s is not None]
        for t in readers:
            t.start()
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
            raise
        for t in readers:
            t.join()
        return texts.get("out"), texts.get("err")


def run(*args: Any, env: Mapping[str, str] | None = None, timeout: float | None = None,
        stdout: Any = PIPE, stderr: Any = PIPE) -> subprocess.CompletedProcess:
    """`pld ARGS` to its end, like ``subprocess.run(..., capture_output=True, text=True)``."""
    child = Forked(args, env=env, stdout=stdout, stderr=stderr)
    out, err = child.communicate(timeout)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _run_command(args: list[str], env: dict[str, str], fds: list[int | None], terminal: bool,
                 target: Callable[[], Any] | None) -> int:
    """In the child: a process as `python -m pld_pipeline ARGS` starts it, then the command; its exit status."""
    if terminal:
        import fcntl
        import termios
        os.setsid()
        fcntl.ioctl(fds[0], termios.TIOCSCTTY, 0)
    for std, fd in enumerate(fds):
        if fd is not None and fd != std:
            os.dup2(fd, std)
    os.environ.clear()
    os.environ.update(env)
    # Python's start-up state, not pytest's
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    faulthandler.disable()
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                                   line_buffering=os.isatty(1))
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                                   errors="backslashreplace", line_buffering=True)
    sys.excepthook, sys.unraisablehook = sys.__excepthook__, sys.__unraisablehook__
    threading.excepthook = threading.__excepthook__
    warnings.resetwarnings()  # then Python's default filters, and printing to stderr
    for category in (ResourceWarning, ImportWarning, PendingDeprecationWarning, DeprecationWarning):
        warnings.simplefilter("ignore", category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    warnings.showwarning = warnings._showwarning_orig  # type: ignore[attr-defined]
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    for name in [m for m in sys.modules if m == "pld_pipeline_cli" or m.startswith("pld_pipeline_cli.")]:
        del sys.modules[name]
    if "huggingface_hub.constants" in sys.modules:  # read from the environment at import (HF_HOME, HF_HUB_OFFLINE,
        importlib.reload(sys.modules["huggingface_hub.constants"])  # HF_ENDPOINT); the hub client reads them there
    sys.argv = ["pld", *args]
    code: Any = 0
    try:
        if target is not None:
            target()
        else:
            from pld_pipeline_cli.app import main
            main()
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:  # as Python ends on one: the traceback, then death by SIGINT
        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    finally:
        threading._shutdown()  # type: ignore[attr-defined]  # non-daemon threads end first, as at exit
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code & 0xFF


def ranks(args: Sequence[Any], n: int, port: int, env: Mapping[str, str] | None = None, **streams: Any) -> list[Forked]:
    """`torchrun --nproc_per_node N pld ARGS` on one machine, as torchrun starts it: N processes that differ only in
    the environment torchrun gives each (rank, world size, the rendezvous address), forked instead of started."""
    base = dict(os.environ if env is None else env)
    return [Forked(args, env={**base, "RANK": str(r), "LOCAL_RANK": str(r), "GROUP_RANK": "0", "ROLE_RANK": str(r),
                              "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n), "ROLE_WORLD_SIZE": str(n),
                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "forked"},
                   **streams)
            for r in range(n)]
