"""The sandbox: values come back, and hostile snippets end in an error, leaving nothing behind; reads and
writes stay inside the boundary when the sandbox runs in a process started the way the RL and evaluation
jobs start, as root and as an ordinary user. No test here asserts a timing (bench/sandbox.py measures)."""

import os
import signal
import socket
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
    result = pool.run(code, timeout=timeout, **kw)
    assert not result.ok and result.error, result
    assert "stopped answering" not in result.error        # the worker's own limits ended it, not the pool's
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
    assert result.seconds > 0


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


def test_a_hundred_snippets_in_one_batch_all_come_back(pool):
    # Throughput (snippets per second) is measured by bench/sandbox.py, not asserted here.
    results = pool.map([TINYGSM] * 100)
    assert [r.value for r in results] == ["18"] * 100


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


# ---------------------------------------------------------------------------------------------------
# The boundary as the jobs use it: reads and writes from inside a process started like the RL and
# evaluation jobs, as root and as an ordinary user, each hostile snippet against a control run of the
# same code outside the sandbox. A planted project (results/data/source=gsm8k/{train,test}.parquet,
# config.yaml) lives in the home directory, beside a mode-600 secret, outside /tmp (whose private copy in
# the workers would hide them whatever the read rules). Refusals must be "permission denied", not "not
# found", so that a file the workers cannot even see does not pass for a confined read.
# ---------------------------------------------------------------------------------------------------

import json  # noqa: E402
import pwd  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

from conftest import ROOT  # noqa: E402

GOLD = "results/data/source=gsm8k"
TEST_USER = f"echochamber-sbx{os.getpid()}"          # one per test process (xdist workers run side by side)

# What the job does: score the hostile completions through the entry its stage uses (RL:
# echochamber.rl.scoring.score; evaluation: echochamber.evaluate.default_scorer()), then run the same
# code without the sandbox (the control), remove what the control wrote, print one JSON line.
JOB = r'''
import json, os, sys
from echochamber.io import setup_logging

stage, log_file, snippets_file = sys.argv[1:4]
setup_logging(log_file)
snippets = json.load(open(snippets_file))
names = sorted(snippets)
completions = [snippets[n]["code"] for n in names]
if stage == "rl":
    from echochamber.rl.scoring import score
    verdicts = score(completions, ["0"] * len(names))
else:
    from echochamber.evaluate import default_scorer
    verdicts = default_scorer()(completions, ["0"] * len(names))
from echochamber.sandbox import isolation_report
out = {"isolation": isolation_report(), "sys_path": sys.path, "cwd": os.getcwd(), "uid": os.getuid()}
for name, verdict in zip(names, verdicts):
    target = snippets[name].get("target")
    row = {"answer": verdict.answer, "error": verdict.error,
           "written": bool(target) and os.path.exists(target)}
    env = {}
    try:
        exec(snippets[name]["code"], env)
        row["control"], row["control_error"] = str(env["simple_math_problem"]()), None
    except BaseException as e:
        row["control"], row["control_error"] = None, f"{type(e).__name__}: {e}"
    row["control_written"] = bool(target) and os.path.exists(target)
    if target and os.path.exists(target):
        os.remove(target)
    out[name] = row
print("RESULT " + json.dumps(out))
'''


def _function(body: str) -> str:
    """A TinyGSM completion whose function runs ``body``."""
    return "def simple_math_problem() -> int:\n" + "".join(f"    {line}\n" for line in body.strip().splitlines())


def _read_via_sys_path(literal: str, relative: str) -> str:
    """Read ``literal``, else ``relative`` under every entry of sys.path and the working directory."""
    return _function(f"""
import os, sys
tried = [{literal!r}] + [os.path.join(p or '.', {relative!r}) for p in sys.path] + [{relative!r}]
error = None
for path in tried:
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        error = error if isinstance(error, PermissionError) else e
raise error
""")


def _read_via_libc(path: str) -> str:
    """Past the in-process guard: only Landlock stands in the way."""
    return _function(f"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.open({path.encode()!r}, 0)
if fd < 0:
    raise OSError(ctypes.get_errno(), 'libc open failed')
buf = ctypes.create_string_buffer(4096)
n = libc.read(fd, buf, 4096)
return buf.raw[:n].decode()
""")


def _read_project_files(project: str) -> str:
    """Any file of the project: known names, then whatever sys.path shows inside the project."""
    return _function(f"""
import os, sys
project = {project!r}
tried = [os.path.join(project, 'config.yaml'), os.path.join(project, 'workflow_scripts', 'hostile_job.py')]
for p in sys.path:
    if p.startswith(project):
        try:
            tried += [os.path.join(p, name) for name in sorted(os.listdir(p))]
        except OSError:
            pass
error = None
for path in tried:
    try:
        with open(path) as f:
            return path + ': ' + f.read(40)
    except OSError as e:
        error = error if isinstance(error, PermissionError) else e
raise error
""")


def _write(path: str) -> str:
    return _function(f"open({path!r}, 'w').write('escaped')\nreturn 'written'")


def _write_via_libc(path: str) -> str:
    return _function(f"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.open({path.encode()!r}, os.O_WRONLY | os.O_CREAT, 0o644)
if fd < 0:
    raise OSError(ctypes.get_errno(), 'libc open failed')
return 'written'
""")


def hostile_snippets(layout: dict) -> dict:
    """name -> {code, target (a file a write would create), marker (what a read would return), libc}"""
    home, project = layout["home"], layout["project"]
    train, test = f"{project}/{GOLD}/train.parquet", f"{project}/{GOLD}/test.parquet"
    secret = f"{home}/secret.txt"
    return {
        "gold_train": {"code": _read_via_sys_path(train, f"{GOLD}/train.parquet"), "marker": layout["gold"]},
        "gold_test": {"code": _read_via_sys_path(test, f"{GOLD}/test.parquet"), "marker": layout["gold"]},
        "gold_train_libc": {"code": _read_via_libc(train), "marker": layout["gold"], "libc": True},
        "project_file": {"code": _read_project_files(project), "marker": "project:"},
        "home_secret": {"code": _read_via_sys_path(secret, "secret.txt"), "marker": layout["secret"]},
        "home_secret_libc": {"code": _read_via_libc(secret), "marker": layout["secret"], "libc": True},
        "write_project": {"code": _write(f"{project}/escaped.txt"), "target": f"{project}/escaped.txt"},
        "write_home": {"code": _write(f"{home}/escaped.txt"), "target": f"{home}/escaped.txt"},
        "write_project_libc": {"code": _write_via_libc(f"{project}/escaped-libc.txt"),
                               "target": f"{project}/escaped-libc.txt", "libc": True},
    }


def _outside_tmp_base() -> Path:
    """A fresh directory outside /tmp, /var/tmp and /dev/shm (the workers' private copies would hide it)."""
    for parent in (["/home"] if os.geteuid() == 0 else []) + [os.path.expanduser("~")]:
        real = os.path.realpath(parent)
        if os.path.isdir(real) and os.access(real, os.W_OK) and not real.startswith(("/tmp", "/var/tmp", "/dev/shm")):
            return Path(tempfile.mkdtemp(prefix="echochamber-sbx-", dir=real))
    pytest.skip("no writable directory outside /tmp for a planted project (tried /home and $HOME)")


@pytest.fixture(scope="session")
def ordinary_user():
    """(uid, gid) of an ordinary user to run jobs as: a system user made for the session when we are root
    (removed afterwards), else ourselves."""
    if os.geteuid() != 0:
        yield os.getuid(), os.getgid()
        return
    if not shutil.which("useradd") or not shutil.which("setpriv") or not shutil.which("unshare"):
        pytest.skip("as root, the ordinary-user runs need useradd, setpriv and unshare (util-linux)")
    made = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                           "--shell", "/usr/sbin/nologin", TEST_USER], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"useradd {TEST_USER} failed: {made.stderr.strip()}")
    try:
        entry = pwd.getpwnam(TEST_USER)
        yield entry.pw_uid, entry.pw_gid
    finally:
        subprocess.run(["userdel", TEST_USER], capture_output=True)


def _make_layout(uid: int, gid: int) -> dict:
    """base/home (mode 700, the user's) with secret.txt (mode 600) and the project home/proj."""
    base = _outside_tmp_base()
    os.chmod(base, 0o755)
    home, project = base / "home", base / "home" / "proj"
    gold, secret = f"GOLD-{uuid.uuid4().hex}", f"SECRET-{uuid.uuid4().hex}"
    (project / GOLD).mkdir(parents=True)
    (project / "workflow_scripts").mkdir()
    (project / GOLD / "train.parquet").write_text(f"PAR1 {gold} 18 PAR1")
    (project / GOLD / "test.parquet").write_text(f"PAR1 {gold} 42 PAR1")
    (project / "config.yaml").write_text(f"project: {gold}\n")
    (project / "workflow_scripts" / "hostile_job.py").write_text(JOB)
    (home / "secret.txt").write_text(secret)
    os.chmod(home / "secret.txt", 0o600)
    os.chmod(home, 0o700)
    layout = {"base": str(base), "home": str(home), "project": str(project), "gold": gold, "secret": secret,
              "uid": uid, "gid": gid}
    snippets = base / "snippets.json"
    snippets.write_text(json.dumps(hostile_snippets(layout)))
    layout["snippets"] = str(snippets)
    if (uid, gid) != (os.getuid(), os.getgid()):
        for path in [home, *home.rglob("*")]:
            os.chown(path, uid, gid)
    return layout


def _exposing_mounts(uid: int, scratch: Path) -> list[str]:
    """Shell lines that, in a private mount namespace, let ``uid`` reach the interpreter and the checkout
    where an ancestor directory is closed to others (pyenv under a mode-700 /root): a tmpfs over that
    directory with only the needed entries bound back. Nothing outside the namespace changes."""
    needed = {os.path.realpath(p) for p in (sys.executable, sys.prefix, sys.base_prefix, ROOT)}
    closed: dict[str, set[str]] = {}
    for path in needed:
        parts = Path(path).parts
        for depth in range(1, len(parts) - 1):
            parent = os.path.join(*parts[:depth])
            if not os.stat(parent).st_mode & 0o001:
                closed.setdefault(parent, set()).add(parts[depth])
                break
    lines = []
    for i, (parent, children) in enumerate(sorted(closed.items())):
        if any(p != parent and p.startswith(parent + "/") for p in closed):
            pytest.skip(f"nested closed directories under {parent}: cannot expose the interpreter to uid {uid}")
        keep = scratch / f"keep{i}"
        for j, child in enumerate(sorted(children)):
            (keep / str(j)).mkdir(parents=True, exist_ok=True)
            lines.append(f"mount --bind {os.path.join(parent, child)!r} {str(keep / str(j))!r}")
        lines.append(f"mount -t tmpfs -o mode=755 tmpfs {parent!r}")
        for j, child in enumerate(sorted(children)):
            lines += [f"mkdir -p {os.path.join(parent, child)!r}",
                      f"mount --bind {str(keep / str(j))!r} {os.path.join(parent, child)!r}",
                      f"umount -l {str(keep / str(j))!r}"]
    return lines


def run_job(layout: dict, startup: str, as_user: bool) -> tuple[dict, str]:
    """Start a job the way the workflow does and return its JSON result and its log.

    ``rl``: ``python -m echochamber.launch ... workflow_scripts/hostile_job.py`` from the project (rules/rl.smk;
    one process: the launcher runs the script in its own interpreter). ``eval``: Snakemake's ``script:``,
    ``python .snakemake/scripts/tmpXXXX.hostile_job.py`` from the project, behind Snakemake's preamble that
    extends sys.path with its own package and the script's folder. ``home``: the RL launcher started from
    the home directory. ``rank``: one process of a multi-process RL job, as torchrun starts each under
    ``accelerate launch``: ``python -u workflow_scripts/hostile_job.py`` from the project."""
    project, home = Path(layout["project"]), layout["home"]
    log = project / "results" / "logs" / f"{startup}.log"
    launch = [sys.executable, "-m", "echochamber.launch", "--processes", "1", "--port", "29500",
              "--precision", "fp32"]
    if startup == "eval":
        scripts = project / ".snakemake" / "scripts"
        scripts.mkdir(parents=True, exist_ok=True)
        script = scripts / f"tmp{uuid.uuid4().hex[:8]}.hostile_job.py"
        searchpaths = [str(Path(__import__("snakemake").__file__).parents[1]), str(project / "workflow_scripts")]
        script.write_text(f"import sys; sys.path.extend({searchpaths!r})\n" + JOB)
        cmd, cwd = [sys.executable, str(script.relative_to(project)), "eval"], project
    elif startup == "rl":
        cmd, cwd = [*launch, "workflow_scripts/hostile_job.py", "rl"], project
    elif startup == "rank":
        cmd, cwd = [sys.executable, "-u", "workflow_scripts/hostile_job.py", "rl"], project
    else:
        cmd, cwd = [*launch, str(project / "workflow_scripts" / "hostile_job.py"), "rl"], Path(home)
    cmd += [str(log), layout["snippets"]]
    env = {"HOME": home, "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": "1"}
    for name in ("PYTHONPATH", "LD_LIBRARY_PATH"):                # how the tests themselves import
        if name in os.environ:
            env[name] = os.environ[name]
    if as_user and os.geteuid() == 0:
        log.parent.mkdir(parents=True, exist_ok=True)
        for path in [Path(home), *Path(home).rglob("*")]:
            os.chown(path, layout["uid"], layout["gid"])
        mounts = _exposing_mounts(layout["uid"], Path(layout["base"]) / "mnt")
        drop = ["setpriv", f"--reuid={layout['uid']}", f"--regid={layout['gid']}", "--clear-groups", "--"]
        if not mounts:
            cmd = [*drop, *cmd]
        elif subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
            pytest.skip(f"uid {layout['uid']} cannot reach the interpreter (a closed directory above it) and "
                        "unshare --mount, which would expose it in a private mount namespace, is refused here")
        else:
            cmd = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-ec",
                   "\n".join([*mounts, 'exec "$@"']), "sh", *drop, *cmd]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):]), log.read_text()


_JOBS: dict = {}
STARTUPS = ["rl", "eval", "home", "rank"]


@pytest.fixture(scope="module", params=["root", "user"])
def job_user(request, ordinary_user):
    """A planted layout owned by root (skipped unless we are root) or by an ordinary user."""
    if request.param == "root":
        if os.geteuid() != 0:
            pytest.skip("the root runs need root")
        uid, gid = 0, 0
    else:
        uid, gid = ordinary_user
    layout = _make_layout(uid, gid)
    yield request.param, layout
    shutil.rmtree(layout["base"], ignore_errors=True)
    _JOBS.clear()


def job(job_user, startup: str) -> tuple[dict, str]:
    user, layout = job_user
    key = (user, layout["base"], startup)
    if key not in _JOBS:
        _JOBS[key] = run_job(layout, startup, as_user=user == "user")
    return _JOBS[key]


def _refused(row: dict, spec: dict) -> str:
    """Why a sandboxed hostile snippet counts as refused; fails the test otherwise."""
    said = f"{row['answer']} {row['error']}"
    assert row["answer"] is None and row["error"], row
    if "marker" in spec:
        assert spec["marker"] not in said, row
    assert "Permission" in row["error"] or "Errno 13" in row["error"], row    # denied, not "not found"
    return row["error"]


@pytest.mark.parametrize("startup", STARTUPS)
@pytest.mark.parametrize("name", ["gold_train", "gold_test", "gold_train_libc", "project_file", "home_secret",
                                  "home_secret_libc", "write_project", "write_home", "write_project_libc"])
def test_hostile_snippets_are_refused_where_the_same_code_succeeds_outside(job_user, startup, name):
    user, layout = job_user
    result, log = job(job_user, startup)
    spec = hostile_snippets(layout)[name]
    row = result[name]
    # the control: the same code, in the same job process, without the sandbox
    assert row["control_error"] is None, row
    if "marker" in spec:
        assert spec["marker"] in row["control"], row
    else:
        assert row["control_written"], row
    if spec.get("libc") and not result["isolation"].get("reads_confined", result["isolation"]["landlock_abi"]):
        assert "reads are NOT confined" in log                  # said in the job's log ...
        pytest.skip("no Landlock here: libc calls get past the in-process guard (the log says so)")
    _refused(row, spec)
    assert not row["written"], row


@pytest.mark.parametrize("startup", STARTUPS)
def test_each_job_logs_and_reports_its_isolation_layers(job_user, startup):
    user, layout = job_user
    result, log = job(job_user, startup)
    report = result["isolation"]
    assert result["uid"] == layout["uid"] and result["cwd"] == (layout["home"] if startup == "home"
                                                                 else layout["project"])
    # started as the workflow starts it: python -m puts the working directory first on sys.path, a script
    # its own folder (in the project)
    first = {"rl": layout["project"], "home": layout["home"], "rank": f"{layout['project']}/workflow_scripts",
             "eval": f"{layout['project']}/.snakemake/scripts"}
    assert result["sys_path"][0] == first[startup]
    assert {"user", "network", "filesystem", "reads", "writes", "landlock_abi", "no_processes"} <= set(report)
    if user == "user":
        assert report["user"] == f"uid {layout['uid']} (unchanged)"
    lines = [line for line in log.splitlines() if "sandbox isolation:" in line]
    assert len(lines) == 1, log                                 # once per job
    for key, value in report.items():
        assert f"{key}: {value}" in lines[0]
    if report["landlock_abi"]:
        assert report["reads_confined"] and report["reads"].startswith("Landlock: only the interpreter")
        assert "NOT confined" not in log
    else:
        assert not report["reads_confined"] and "reads are NOT confined" in log


# ---------------------------------------------------------------------------------------------------
# Reads in this process (pytest: the checkout is the working directory and its tests/ on sys.path), the
# allowlist itself, and the fallback without Landlock
# ---------------------------------------------------------------------------------------------------

import logging  # noqa: E402

from echochamber.sandbox import isolation_report  # noqa: E402
from echochamber.sandbox import pool as pool_module  # noqa: E402


@pytest.fixture
def planted():
    """A mode-600 secret outside /tmp (the workers' private /tmp would hide one there); removed afterwards."""
    base = _outside_tmp_base()
    secret = base / "secret.txt"
    secret.write_text(f"SECRET-{uuid.uuid4().hex}")
    os.chmod(secret, 0o600)
    yield secret
    shutil.rmtree(base, ignore_errors=True)


def test_the_allowlist_holds_the_interpreter_and_allowed_packages_never_the_callers_places():
    from echochamber.sandbox.confinement import PACKAGES, read_allowlist

    places = [str(ROOT), os.getcwd(), os.path.expanduser("~")]
    roots, listable, packages = read_allowlist(places)
    for place in [*places, str(ROOT / "src"), str(ROOT / "results"), str(ROOT / "tests")]:
        place = os.path.realpath(place)
        assert not any(place == r or place.startswith(r.rstrip("/") + "/") for r in roots + listable), place
    assert os.path.realpath(os.__file__) in roots                          # the standard library, entry by entry
    assert not any(r.endswith(("/site-packages", "/dist-packages")) for r in roots)
    for name in packages:
        assert name in PACKAGES
    import sympy

    assert os.path.dirname(os.path.realpath(sympy.__file__)) in roots


def test_reads_of_the_checkout_and_of_sys_path_entries_are_refused(pool):
    # this process runs from the checkout, with tests/ on sys.path: neither is readable by a snippet
    for path in (ROOT / "config.yaml", Path(__file__), ROOT / "src" / "echochamber" / "reward.py"):
        assert path.exists() and path.read_text()                          # the control: we can read it
        result = pool.run(f"open({str(path)!r}).read()")
        assert not result.ok and "Permission" in result.error, (path, result)
    assert "Permission" in pool.run(f"import os\nos.listdir({str(ROOT)!r})").error
    if pool.isolation["landlock_abi"]:                                     # past the guard: Landlock alone
        result = pool.run(_read_via_libc(str(ROOT / "config.yaml")), mode="function")
        assert not result.ok and "Errno 13" in result.error, result


def test_allowed_packages_import_in_the_child_and_others_are_refused(pool):
    assert pool.run("import mpmath\nmpmath.mpf(2) ** 2").value == "4.0"     # not preloaded: read in the child
    assert pool.run("import numpy as np\nnp.arange(4).sum()", timeout=20).value == "6"
    assert pool.run("import statistics, hashlib\nstatistics.mean([1, 2, 3])").value == "2"
    assert pool.run("import zoneinfo\nstr(zoneinfo.ZoneInfo('Europe/Paris'))").value == "Europe/Paris"
    refused = pool.run("import yaml")                                       # installed, not allowed
    assert not refused.ok and "Permission" in refused.error, refused
    seen = __import__("ast").literal_eval(pool.run("import sys\nsys.path").value)
    assert not {"", ".", str(ROOT), str(ROOT / "src"), os.getcwd()} & set(seen), seen


def test_a_read_of_a_planted_secret_is_refused_where_plain_python_reads_it(pool, planted):
    code = f"open({str(planted)!r}).read()"
    control = subprocess.run([sys.executable, "-c", f"print({code})"], capture_output=True, text=True)
    assert control.stdout.strip() == planted.read_text()                   # the control, without the sandbox
    result = pool.run(code)
    assert not result.ok and "Permission" in result.error and planted.read_text() not in str(result)


def test_the_pool_logs_its_isolation_layers_once(monkeypatch, caplog):
    monkeypatch.setattr(pool_module, "_announced", set())
    caplog.set_level(logging.INFO, logger="echochamber.sandbox")
    with SandboxPool(workers=1) as fresh:
        fresh.run("1")
        fresh.run("2")
        report = fresh.isolation
    said = [r.getMessage() for r in caplog.records if "sandbox isolation:" in r.getMessage()]
    assert len(said) == 1 and all(f"{k}: {v}" in said[0] for k, v in report.items())
    assert report["reads_confined"] == bool(report["landlock_abi"])
    assert set(isolation_report()) == set(report)                           # the shared pool reports the same


def test_without_landlock_the_report_and_the_log_say_reads_are_not_confined(monkeypatch, caplog, planted):
    monkeypatch.setattr(pool_module, "_announced", set())
    caplog.set_level(logging.INFO, logger="echochamber.sandbox")
    with SandboxPool(workers=1) as fresh:
        fresh._landlock = False
        assert fresh.run(TINYGSM).value == "18"
        report = fresh.isolation
        # the in-process guard still refuses Python-level reads and listings, and keeps allowed imports
        denied = fresh.run(f"open({str(planted)!r}).read()")
        assert not denied.ok and "sandbox: reading outside" in denied.error, denied
        assert "sandbox: listing outside" in fresh.run(f"import os\nos.listdir({str(ROOT)!r})").error
        assert fresh.run("import mpmath\nmpmath.mpf(3) * 2").value == "6.0"
        fresh.run("3")
    assert report["landlock_abi"] == 0 and report["reads_confined"] is False
    assert report["reads"].startswith("NOT confined")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "NOT confined" in r.getMessage()]
    assert len(warnings) == 1                                               # once, not once per batch


def test_without_landlock_a_pool_can_be_told_to_refuse_to_run(monkeypatch):
    from echochamber.reward import score_batch
    from echochamber.sandbox import ReadsNotConfined

    monkeypatch.setenv(pool_module.REQUIRE_LANDLOCK_ENV, "1")
    with SandboxPool(workers=1) as fresh:
        fresh._landlock = False
        with pytest.raises(ReadsNotConfined, match="cannot confine reads"):
            fresh.run("1")
        with pytest.raises(ReadsNotConfined, match="cannot confine reads"):     # and keeps refusing
            score_batch([TINYGSM], ["18"], pool=fresh)
    # not an Exception: the RL loop's "score one by one, reward 0 on error" cannot swallow it
    assert not issubclass(ReadsNotConfined, Exception)
    with SandboxPool(workers=1) as fresh:                                      # with Landlock: runs
        try:
            result = fresh.run(TINYGSM)
        except ReadsNotConfined:
            assert not fresh.isolation["reads_confined"]                       # a machine without Landlock
        else:
            assert fresh.isolation["reads_confined"] and result.value == "18"
