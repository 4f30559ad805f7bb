"""The sandbox: values come back, and hostile snippets end in an error, on time, leaving nothing behind."""

import os
import signal
import socket
import time
import uuid
from pathlib import Path

import pytest

from echochamber.sandbox import _WORKER_TAG, SandboxPool, SandboxResult, run_snippet

TINYGSM = '''def simple_math_problem() -> int:
    """Janet's ducks lay 16 eggs per day..."""
    eggs = 16
    left = eggs - 3 - 4
    result = left * 2
    return result
'''


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=2) as p:
        yield p


# ---------------------------------------------------------------------------------------------------
# Helpers: processes that are ours, files outside the sandbox
# ---------------------------------------------------------------------------------------------------

def _processes() -> dict[int, tuple[int, bytes]]:
    """pid -> (parent pid, command line) for every process we can see."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        found[int(entry)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    return found


def stray_processes(pool: SandboxPool) -> list[int]:
    """Processes left by snippets: descendants of this test process, or forks of the pool's workers
    (they carry its token on their command line), other than the idle workers of any pool."""
    procs, me = _processes(), os.getpid()
    workers = {pid for pid, (ppid, cmd) in procs.items() if ppid == me and _WORKER_TAG.encode() in cmd}

    def descends_from_me(pid: int) -> bool:
        for _ in range(64):
            pid = procs.get(pid, (0, b""))[0]
            if pid == me:
                return True
            if pid <= 1:
                return False
        return False

    return [pid for pid, (_, cmd) in procs.items()
            if pid not in workers and (pool.token.encode() in cmd or descends_from_me(pid))]


def run_hostile(pool: SandboxPool, code: str, timeout: float = 1.0, **kw) -> SandboxResult:
    """Run a snippet and check the invariants every hostile snippet must keep."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)}
    cwd, env = os.getcwd(), dict(os.environ)
    start = time.monotonic()
    result = pool.run(code, timeout=timeout, **kw)
    elapsed = time.monotonic() - start
    assert not result.ok and result.error, result
    assert elapsed <= timeout + 1.0, f"took {elapsed:.2f} s for a {timeout} s timeout"
    assert stray_processes(pool) == []
    for worker in pool._workers:                             # each snippet's directory is gone
        assert os.listdir(f"/proc/{worker.proc.pid}/root{worker.scratch}") == []
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert (os.getcwd(), dict(os.environ)) == (cwd, env)
    assert pool.run(TINYGSM).value == "18"                   # the pool still works
    return result


@pytest.fixture
def outside():
    """A path outside any sandbox directory, in a world-writable place; removed afterwards."""
    path = Path("/tmp") / f"echochamber-escape-{uuid.uuid4().hex}"
    yield path
    path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------------

def test_function_mode_returns_the_return_value(pool):
    result = pool.run(TINYGSM, mode="function")
    assert result == SandboxResult(ok=True, value="18", stdout="", error=None, seconds=result.seconds)
    assert 0 < result.seconds < 3


def test_expression_mode_takes_the_last_expression_and_captures_output(pool):
    result = pool.run("x = 16 - 3 - 4\nprint('eggs', x)\nx * 2\n", mode="expression")
    assert (result.ok, result.value, result.stdout) == (True, "18", "eggs 9\n")


def test_auto_mode(pool):
    assert pool.run(TINYGSM).value == "18"                               # defines a function: call it
    assert pool.run("def f():\n    return 1\nf() + 41").value == "42"   # trailing expression wins
    assert pool.run("y = 3").value is None                               # neither: no value
    assert pool.run("print(5)", mode="script").stdout == "5\n"


def test_errors_are_reported(pool):
    assert "ZeroDivisionError" in pool.run("1 / 0").error
    assert "SyntaxError" in pool.run("def f(:\n").error
    assert "no top-level function" in pool.run("1 + 1", mode="function").error
    with pytest.raises(ValueError):
        pool.run("1", mode="notebook")


def test_map_keeps_order_and_modes(pool):
    codes = [f"def f():\n    return {i} * 2\n" for i in range(20)] + ["7 * 6"]
    results = pool.map(codes, modes=["function"] * 20 + ["expression"])
    assert [r.value for r in results] == [str(i * 2) for i in range(20)] + ["42"]


def test_sympy_values_come_back_as_latex(pool):
    result = pool.run("from sympy import Rational, sqrt\nsqrt(2) / 2 + Rational(1, 3)", timeout=10)
    assert result.ok and result.value.startswith("$") and "\\sqrt{2}" in result.value


def test_run_snippet_uses_the_shared_pool():
    assert run_snippet("6 * 7").value == "42"
    assert run_snippet(TINYGSM, mode="function").value == "18"


def test_the_snippet_has_a_fresh_empty_directory_and_no_stdin(pool):
    code = "import os\nopen('a.txt', 'w').write('x')\n(sorted(os.listdir('.')), input.__name__)"
    assert pool.run(code).value == "(['a.txt'], 'input')"
    assert "EOFError" in pool.run("input()").error


def test_a_killed_worker_is_replaced(pool):
    victim = pool.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    results = pool.map([TINYGSM] * 4)
    assert [r.value for r in results] == ["18"] * 4
    assert victim not in pool.worker_pids()


def test_a_forked_copy_of_the_caller_leaves_the_workers_alone(pool):
    pool.run("1")
    workers = pool.worker_pids()
    pid = os.fork()
    if pid == 0:                                             # e.g. a data-loader process exiting
        pool.close()
        os._exit(0)
    os.waitpid(pid, 0)
    assert pool.run(TINYGSM).value == "18"
    assert pool.worker_pids() == workers                     # not killed and replaced


def test_throughput_is_far_above_one_interpreter_per_snippet(pool):
    pool.map([TINYGSM] * 10)
    start = time.monotonic()
    results = pool.map([TINYGSM] * 100)
    per_second = 100 / (time.monotonic() - start)
    assert all(r.value == "18" for r in results)
    assert per_second > 40, per_second        # a fresh `python -c` per snippet manages about 20-40 here


# ---------------------------------------------------------------------------------------------------
# Hostile snippets, one each
# ---------------------------------------------------------------------------------------------------

def test_infinite_loop(pool):
    assert "timeout" in run_hostile(pool, "while True:\n    pass\n").error


def test_fork_bomb(pool):
    run_hostile(pool, "import os\nwhile True:\n    os.fork()\n")


def test_fork_bomb_through_libc(pool):
    # Bypasses the in-process guard: only the operating system's limits stop it.
    code = "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()\n"
    assert "timeout" in run_hostile(pool, code).error


def test_fork_is_refused_by_the_kernel(pool):
    code = ("import ctypes\nlibc = ctypes.CDLL(None)\npids = [libc.fork() for _ in range(3)]\n"
            "assert pids == [-1, -1, -1], pids\nraise SystemExit('no fork')\n")
    assert "no fork" in run_hostile(pool, code).error


def test_memory_bomb(pool):
    code = "blocks = []\nwhile True:\n    blocks.append(bytearray(32 << 20))\n"
    assert "MemoryError" in run_hostile(pool, code, timeout=3.0, memory_mb=256).error


def test_ten_megabyte_print(pool):
    result = run_hostile(pool, "print('x' * 10_000_000)\n", max_output=1000)
    assert "output limit" in result.error and result.stdout == "x" * 1000


def test_deep_recursion(pool):
    code = "import sys\nsys.setrecursionlimit(10**9)\ndef f(n):\n    return f(n + 1) + 1\nf(0)\n"
    run_hostile(pool, code, timeout=2.0, memory_mb=256)


def test_os_system(pool, outside):
    run_hostile(pool, f"import os\nos.system('touch {outside}')\n")
    assert not outside.exists()


def test_tcp_connect_to_a_local_listener(pool):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        run_hostile(pool, f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n")
        server.settimeout(0.3)
        with pytest.raises(TimeoutError):
            server.accept()


def test_tcp_connect_through_libc(pool):
    # Bypasses the in-process guard: the network namespace (or Landlock) must stop it.
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = ("import ctypes, struct\nlibc = ctypes.CDLL(None)\nfd = libc.socket(2, 1, 0)\n"
                f"addr = struct.pack('=H', 2) + struct.pack('!H', {port}) + bytes([127, 0, 0, 1]) + bytes(8)\n"
                "assert libc.connect(fd, addr, 16) == 0, 'connect failed'\n")
        assert "connect failed" in run_hostile(pool, code).error
        server.settimeout(0.3)
        with pytest.raises(TimeoutError):
            server.accept()


def test_write_outside_the_directory(pool, outside):
    run_hostile(pool, f"open({str(outside)!r}, 'w').write('escaped')\n")
    assert not outside.exists()


def test_write_outside_the_directory_through_libc(pool, outside):
    # Bypasses the in-process guard: Landlock, or the worker's private /tmp, must stop it.
    if not pool.isolation["landlock_abi"] and pool.isolation["filesystem"] == "shared /tmp":
        pytest.skip("neither Landlock nor a private /tmp here: only the in-process guard limits writes")
    code = (f"import ctypes, os\nctypes.CDLL(None).open({str(outside).encode()!r}, os.O_WRONLY | os.O_CREAT, 0o644)\n"
            "raise SystemExit('tried')\n")
    run_hostile(pool, code)
    assert not outside.exists()


def test_exit(pool):
    assert "SystemExit" in run_hostile(pool, "exit()\n").error


def test_os_exit(pool):
    assert "exited with status 0" in run_hostile(pool, "import os\nos._exit(0)\n").error


def test_ctypes_segfault(pool):
    assert "SIGSEGV" in run_hostile(pool, "import ctypes\nctypes.string_at(0)\n").error


def test_signal_tampering(pool):
    code = ("import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM, signal.SIGXCPU):\n"
            "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass\n")
    assert "timeout" in run_hostile(pool, code).error


def test_killing_the_worker(pool):
    workers = pool.worker_pids()
    code = "import ctypes, os\nlibc = ctypes.CDLL(None)\nlibc.kill(os.getppid(), 9)\nos.kill(os.getppid(), 9)\n"
    run_hostile(pool, code)
    assert pool.worker_pids() == workers


def test_the_callers_environment_is_invisible(monkeypatch):
    secret = uuid.uuid4().hex
    monkeypatch.setenv("ECHO_SECRET", secret)
    code = f"""import os
leaked = []
try:
    pids = os.listdir("/proc")
except OSError:
    pids = []
for pid in pids:
    try:
        leaked += [pid] if b"{secret}" in open(f"/proc/{{pid}}/environ", "rb").read() else []
    except OSError:
        pass
print("leaked:", leaked, dict(os.environ))
os.environ["ECHO_SECRET"]
"""
    with SandboxPool(workers=1) as fresh:                    # started after the secret was set
        result = run_hostile(fresh, code, timeout=3.0)
    assert "KeyError" in result.error
    assert result.stdout == "leaked: [] {}\n"


def test_huge_power(pool):
    run_hostile(pool, "10**10**9\n", timeout=2.0)
