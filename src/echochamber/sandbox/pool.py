"""The caller's side: warm worker processes, the snippets handed to them, and the shared pool."""

from __future__ import annotations

import _thread
import atexit
import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from echochamber.sandbox.worker import _recv, _send

MODES = ("auto", "function", "expression", "script")
MAX_CODE = 1_000_000            # characters; longer snippets are refused without running
_GRACE = 10.0                   # seconds a worker may overrun a snippet's timeout before it is replaced
_WORKER_TAG = "echochamber-sandbox-worker"
# Set to 1 to refuse to run snippets where reads cannot be confined (no Landlock); docs/sandbox.md.
REQUIRE_LANDLOCK_ENV = "ECHOCHAMBER_SANDBOX_REQUIRE_LANDLOCK"

log = logging.getLogger("echochamber.sandbox")


class ReadsNotConfined(BaseException):
    """Raised instead of running snippets where reads cannot be confined and ``REQUIRE_LANDLOCK_ENV`` is 1.
    Not an ``Exception``: the RL loop turns a scorer's exception into reward 0 and goes on, and this must
    end the job."""


@dataclass
class SandboxResult:
    ok: bool                    # the snippet ran to completion without an exception
    value: str | None           # str() of the value (sympy objects as $LaTeX$); None when there is none
    stdout: str                 # stdout and stderr together, capped at max_output
    error: str | None           # the exception, timeout, crash or exit status; None when ok
    seconds: float              # wall-clock seconds from fork to the end of the child


# =====================================================================================================
# The pool (caller side).
# =====================================================================================================

class _Worker:
    """One worker process and its pipes."""

    def __init__(self, token: str, landlock: bool = True):
        import subprocess

        avoid = _private_places()
        # The worker finds echochamber and the caller's libraries, never the caller's directories.
        path = [str(Path(__file__).resolve().parents[2])] + [
            p for p in sys.path if os.path.isabs(p) and os.path.realpath(p) not in avoid]
        context = {"avoid": avoid, "landlock": landlock}
        boot = (f"import sys; sys.path[:] = {path!r}; "
                f"from echochamber.sandbox.worker import _worker_main; _worker_main({context!r})")
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-X", "utf8", "-c", boot, _WORKER_TAG, token],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_worker_env(), cwd="/",
            close_fds=True, start_new_session=True, bufsize=0)
        self.fd = self.proc.stdout.fileno()

    def hello(self) -> dict:
        """The worker's first message: its isolation report; remembers its scratch directory."""
        try:
            message = _recv(self.fd)
        except EOFError:
            raise RuntimeError("a sandbox worker failed to start (its error is on stderr)") from None
        self.scratch = message["scratch"]
        return message["isolation"]

    def send(self, req: dict) -> None:
        _send(self.proc.stdin.fileno(), req)

    def recv(self) -> dict:
        return _recv(self.fd)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, 9)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()

    def close(self) -> None:
        self.proc.stdin.close()                               # EOF: the worker cleans up and exits
        try:
            self.proc.wait(timeout=5)
        except Exception:                                     # subprocess.TimeoutExpired
            pass
        self.kill()


def _private_places() -> list[str]:
    """The caller's places no snippet may read, whatever ``sys.path`` holds: the working directory, the
    home directory, and the project when echochamber runs from its checkout (``src/`` layout)."""
    places = [os.environ.get("HOME"), os.path.expanduser("~")]
    try:
        places.append(os.getcwd())
    except OSError:
        pass
    package_root = Path(__file__).resolve().parents[2]
    if package_root.name == "src":
        places.append(str(package_root.parent))
    return sorted({os.path.realpath(p) for p in places if p and os.path.isabs(p)})


_announced: set = set()                 # (process, isolation) pairs already in the log


def _announce(isolation: dict) -> None:
    """Say once per process, in the job's log, which layers the sandbox has; warn if reads are open."""
    key = (os.getpid(), repr(sorted(isolation.items())))
    if key in _announced:
        return
    _announced.add(key)
    log.info("sandbox isolation: %s", "; ".join(f"{k}: {v}" for k, v in isolation.items()))
    if not isolation.get("reads_confined"):
        log.warning("sandbox: reads are NOT confined on this machine (no Landlock): model-written code can "
                    "read what this process can read, through ctypes; set %s=1 to refuse to run instead "
                    "(docs/sandbox.md)", REQUIRE_LANDLOCK_ENV)


def _worker_env() -> dict:
    """Nothing of the caller's environment but the dynamic loader's path; numerical libraries that
    a worker may import on demand are told to start no threads (children may not)."""
    env = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if "LD_LIBRARY_PATH" in os.environ:
        env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    return env


def _request(code: str, mode: str, timeout: float, memory_mb: int, max_output: int) -> dict:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if not (timeout > 0 and memory_mb > 0 and max_output >= 0):
        raise ValueError("timeout and memory_mb must be positive, max_output not negative")
    return {"code": code, "mode": mode, "timeout": float(timeout), "memory_mb": int(memory_mb),
            "max_output": int(max_output)}


def _failure(error: str) -> SandboxResult:
    return SandboxResult(ok=False, value=None, stdout="", error=error, seconds=0.0)


class SandboxPool:
    """Warm workers that run snippets in isolated children, several at a time.

    >>> with SandboxPool() as pool:
    ...     pool.map(["def f():\\n    return 6 * 7\\n", "1 + 1"])[0].value
    '42'
    """

    def __init__(self, workers: int | None = None):
        self.size = max(1, workers or len(os.sched_getaffinity(0)))
        self.token = os.urandom(8).hex()
        self.isolation: dict | None = None
        self._workers: list[_Worker] = []
        self._lock = _thread.allocate_lock()
        self._pid = os.getpid()
        self._landlock = True                                 # False: tests of the fallback without it

    # -- lifecycle ------------------------------------------------------------------------------------
    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if os.getpid() == self._pid:                      # a forked copy must not stop our workers
                for worker in self._workers:
                    worker.close()
            self._workers.clear()

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def _start(self, count: int) -> None:
        """Start workers until there are ``count``; they import in parallel."""
        fresh = [_Worker(self.token, self._landlock) for _ in range(count - len(self._workers))]
        self._workers.extend(fresh)
        try:
            for worker in fresh:
                self.isolation = worker.hello()
        except BaseException:
            for worker in fresh:
                worker.kill()
                self._workers.remove(worker)
            raise
        if self.isolation is not None:
            self._check(self.isolation)

    def _check(self, isolation: dict) -> None:
        _announce(isolation)
        if os.environ.get(REQUIRE_LANDLOCK_ENV) == "1" and not isolation.get("reads_confined"):
            raise ReadsNotConfined(f"the sandbox cannot confine reads on this machine (no Landlock) and "
                                   f"{REQUIRE_LANDLOCK_ENV}=1 asks for that: no snippet runs")

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        fresh = _Worker(self.token, self._landlock)
        fresh.hello()
        self._workers[self._workers.index(worker)] = fresh
        return fresh

    # -- running --------------------------------------------------------------------------------------
    def run(self, code: str, *, mode: str = "auto", timeout: float = 3.0, memory_mb: int = 512,
            max_output: int = 10_000) -> SandboxResult:
        return self.map([code], modes=mode, timeout=timeout, memory_mb=memory_mb, max_output=max_output)[0]

    def map(self, codes, modes="auto", timeout: float = 3.0, memory_mb: int = 512,
            max_output: int = 10_000) -> list[SandboxResult]:
        """Run every snippet isolated; results in input order. ``modes``: one mode or one per snippet."""
        codes = list(codes)
        modes = [modes] * len(codes) if isinstance(modes, str) else list(modes)
        if len(modes) != len(codes):
            raise ValueError("give one mode, or one mode per snippet")
        requests = [_request(c, m, timeout, memory_mb, max_output) for c, m in zip(codes, modes)]
        results: list[SandboxResult | None] = [None] * len(codes)
        for i, code in enumerate(codes):
            if len(code) > MAX_CODE:
                results[i] = _failure(f"code too long ({len(code)} characters, limit {MAX_CODE})")
        todo = deque(i for i, r in enumerate(results) if r is None)
        if todo:
            with self._lock:
                if os.getpid() != self._pid:                  # forked: the workers are the parent's
                    self._workers, self._pid = [], os.getpid()
                self._dispatch(requests, todo, results, timeout + _GRACE)
        return results

    def _dispatch(self, requests, todo: deque, results: list, patience: float) -> None:
        """Hand snippets to idle workers, collect answers; replace workers that die or hang."""
        import selectors

        self._start(min(self.size, len(todo)))
        idle = deque(self._workers)
        busy: dict[_Worker, tuple[int, float]] = {}
        retried: set[int] = set()
        poller = selectors.DefaultSelector()
        try:
            while todo or busy:
                while todo and idle:
                    worker, i = idle.popleft(), todo.popleft()
                    try:
                        worker.send(requests[i])
                    except OSError:                           # died while idle: replace, try again
                        todo.appendleft(i)
                        idle.append(self._replace(worker))
                        continue
                    busy[worker] = (i, time.monotonic() + patience)
                    poller.register(worker.fd, selectors.EVENT_READ, worker)
                wait = min(deadline for _, deadline in busy.values()) - time.monotonic()
                for key, _ in poller.select(max(wait, 0.0)):
                    worker = key.data
                    i, _ = busy.pop(worker)
                    poller.unregister(worker.fd)
                    try:
                        results[i] = SandboxResult(**worker.recv())
                    except (EOFError, OSError, ValueError):
                        worker = self._replace(worker)
                        self._retry_or_fail(i, todo, retried, results, "sandbox worker died")
                    idle.append(worker)
                for worker, (i, deadline) in list(busy.items()):
                    if time.monotonic() > deadline:
                        busy.pop(worker)
                        poller.unregister(worker.fd)
                        idle.append(self._replace(worker))
                        results[i] = _failure("sandbox worker stopped answering")
        finally:
            poller.close()
            for worker in busy:                               # interrupted (e.g. KeyboardInterrupt):
                worker.kill()                                 # its answer would come too late
                self._workers.remove(worker)

    @staticmethod
    def _retry_or_fail(i: int, todo: deque, retried: set, results: list, error: str) -> None:
        if i in retried:
            results[i] = _failure(error)
        else:
            retried.add(i)
            todo.append(i)


# =====================================================================================================
# Module-level conveniences: one shared pool per process, started on first use.
# =====================================================================================================

_default: SandboxPool | None = None
_default_lock = _thread.allocate_lock()


def default_pool() -> SandboxPool:
    """The process-wide pool (warm workers reused across calls; a forked process gets its own)."""
    global _default
    with _default_lock:
        if _default is None or _default._pid != os.getpid():
            _default = SandboxPool()
            atexit.register(_default.close)
        return _default


def run_snippet(code: str, *, mode: str = "auto", timeout: float = 3.0, memory_mb: int = 512,
                max_output: int = 10_000) -> SandboxResult:
    """Run one snippet isolated in the shared pool and return what happened."""
    return default_pool().run(code, mode=mode, timeout=timeout, memory_mb=memory_mb, max_output=max_output)


def isolation_report() -> dict:
    """Which confinement layers the workers of the shared pool have on this machine."""
    pool = default_pool()
    if pool.isolation is None:
        pool.run("None")
    return dict(pool.isolation)
