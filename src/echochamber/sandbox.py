"""Isolated execution of model-written code.

Model code never runs in the calling process. A :class:`SandboxPool` keeps a few warm *worker*
interpreters (nothing of the caller's environment, common modules already imported, their own network
and mount namespaces where the kernel allows); for every snippet a worker forks a fresh *child*, which
confines itself before running the snippet:

- its own session and process group, killed as a whole (SIGKILL) on the wall-clock timeout; the worker
  is a child subreaper, so anything that escapes the group is reparented to it and killed too;
- rlimits: address space (``memory_mb`` above the warm interpreter), CPU seconds, file size, open files,
  no core files, and ``RLIMIT_NPROC`` = 1 so it can start no process or thread;
- as root it drops to ``nobody`` (``RLIMIT_NPROC`` does not bind root), keeping only the right to read
  files (CAP_DAC_READ_SEARCH: the interpreter may live under /root);
- no network: the worker moves itself into a new network namespace at start (as root, or through a
  user namespace otherwise); where the kernel refuses, Landlock and the in-process guard still block TCP;
- a private /tmp: in its own mount namespace the worker covers /tmp, /var/tmp and /dev/shm with small
  tmpfs mounts nobody else sees, and makes each child's fresh directory there;
- Landlock (where the kernel has it): writes only inside the child's fresh temporary directory, reads
  only under the Python installation and system libraries, no TCP, no signals to processes outside;
- an in-process audit hook (a second line, not the boundary): no sockets, subprocesses, fork, exec,
  kill, or file writes outside the directory;
- an empty environment, stdin from /dev/null, stdout and stderr captured up to ``max_output`` (a child
  that prints more is killed).

Each optional layer is probed when a worker starts; :func:`isolation_report` says which are active.

Whatever the snippet does (``exit()``, ``os._exit``, a segfault, ignoring signals, a C-level endless
computation), the caller gets a :class:`SandboxResult`; a worker that dies anyway is replaced.
"""

from __future__ import annotations

import _thread
import atexit
import json
import math
import os
import struct
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

MODES = ("auto", "function", "expression", "script")
MAX_CODE = 1_000_000            # characters; longer snippets are refused without running
_GRACE = 10.0                   # seconds a worker may overrun a snippet's timeout before it is replaced
_WORKER_TAG = "echochamber-sandbox-worker"
# Imported into every worker before it forks. Not `random`, `statistics` or `threading`: their at-fork
# handlers would triple the cost of every fork.
_PRELOAD = ("ast", "io", "resource", "signal", "math", "cmath", "fractions", "decimal", "itertools",
            "functools", "collections", "datetime", "re", "string", "operator", "ctypes")
_ON_DEMAND = ("sympy", "numpy")  # imported into a worker when a snippet first mentions them


@dataclass
class SandboxResult:
    ok: bool                    # the snippet ran to completion without an exception
    value: str | None           # str() of the value (sympy objects as $LaTeX$); None when there is none
    stdout: str                 # stdout and stderr together, capped at max_output
    error: str | None           # the exception, timeout, crash or exit status; None when ok
    seconds: float              # wall-clock seconds from fork to the end of the child


# =====================================================================================================
# The child: a fresh fork of a warm worker, one per snippet. Nothing here returns to the worker.
# =====================================================================================================

def _pick_mode(tree, mode: str) -> str:
    """``auto``: call the function the code defines unless the code ends in an expression."""
    import ast

    if mode != "auto":
        return mode
    defines = any(isinstance(node, ast.FunctionDef) for node in tree.body)
    trailing = bool(tree.body) and isinstance(tree.body[-1], ast.Expr)
    return "function" if defines and not trailing else "expression"


def _evaluate(code: str, mode: str):
    """Run the snippet in fresh globals; return its value (function result or last expression)."""
    import ast
    import builtins

    tree = ast.parse(code, "<snippet>")
    mode = _pick_mode(tree, mode)
    env = {"__name__": "__main__", "__builtins__": builtins}
    body = tree.body
    if mode == "expression" and body and isinstance(body[-1], ast.Expr):
        exec(compile(ast.Module(body[:-1], []), "<snippet>", "exec"), env)
        return eval(compile(ast.Expression(body[-1].value), "<snippet>", "eval"), env)
    exec(compile(tree, "<snippet>", "exec"), env)
    if mode != "function":
        return None
    name = next((n.name for n in body if isinstance(n, ast.FunctionDef)), None)
    if name is None:
        raise LookupError("the code defines no top-level function")
    return env[name]()


def _render(value, limit: int) -> str | None:
    """The value as text; sympy objects as LaTeX so that answer equivalence can read them back."""
    if value is None:
        return None
    sympy = sys.modules.get("sympy")
    if sympy is not None and _has_sympy(value, sympy):
        return f"${sympy.latex(value)}$"[:limit]
    return str(value)[:limit]


def _has_sympy(value, sympy) -> bool:
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(isinstance(v, sympy.Basic) for v in value)
    return isinstance(value, (sympy.Basic, sympy.MatrixBase))


def _describe(exc: BaseException) -> str:
    try:
        text = f"{type(exc).__name__}: {exc}"
    except BaseException:       # a hostile __str__
        text = type(exc).__name__
    return text[:1000]


def _child_main(req: dict, workdir: str, out_fd: int, res_fd: int, box: _Confinement) -> None:
    """Confine this process, run the snippet, write one JSON result to fd 3, exit."""
    try:
        box.wire_fds(out_fd, res_fd)
        try:
            box.enter(workdir, req)
        except BaseException as exc:
            _finish({"ok": False, "value": None, "error": f"sandbox setup failed: {_describe(exc)}"})
        result = {"ok": True, "value": None, "error": None}
        try:
            result["value"] = _render(_evaluate(req["code"], req["mode"]), req["max_output"])
        except BaseException as exc:  # SystemExit and KeyboardInterrupt included
            result = {"ok": False, "value": None, "error": _describe(exc)}
        _finish(result)
    finally:
        os._exit(70)


def _finish(result: dict) -> None:
    for stream in (sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass
    os.write(3, json.dumps(result, ensure_ascii=False).encode())
    os._exit(0)


# =====================================================================================================
# Operating-system confinement, prepared once per worker and entered by every child.
# =====================================================================================================

_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_KEEPCAPS = 1, 4, 8
_PR_SET_NO_NEW_PRIVS, _PR_SET_CHILD_SUBREAPER = 38, 36
_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_REC, _MS_PRIVATE = 2, 4, 0x4000, 1 << 18
_CAP_DAC_READ_SEARCH = 2
_NOBODY = 65534

# Landlock (include/uapi/linux/landlock.h): syscall numbers are the same on every architecture.
_LL_CREATE, _LL_ADD_RULE, _LL_RESTRICT = 444, 445, 446
_LL_FS_BITS_BY_ABI = {1: 13, 2: 14, 3: 15, 4: 15, 5: 16}      # number of filesystem rights
_LL_FS_READ = 1 << 0 | 1 << 2 | 1 << 3                          # execute, read file, read dir
_LL_FS_FILE = 1 << 0 | 1 << 1 | 1 << 2 | 1 << 14 | 1 << 15      # rights that apply to a file
_LL_SCOPE_ALL = 1 << 0 | 1 << 1                                 # abstract unix sockets, signals


class _Confinement:
    """What a worker learned about its kernel, and the steps a child takes to lock itself in."""

    def __init__(self):
        import ctypes

        self.ctypes = ctypes
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.root = os.geteuid() == 0
        self.drop = self.root                 # to nobody; off when the probe in isolate_worker fails
        self.landlock_abi = max(0, self.libc.syscall(_LL_CREATE, None, 0, 1))
        self.network = "shared (guard only)"
        self.filesystem = "shared /tmp"
        self.read_roots = _read_roots()

    def report(self) -> dict:
        return {
            "user": "nobody (uid 65534)" if self.drop else f"uid {os.getuid()} (unchanged)",
            "network": self.network + ("" if self.network.startswith("own") else
                                       "; Landlock blocks TCP" if self.landlock_abi >= 4 else
                                       "; only the in-process guard blocks sockets (ctypes gets past it)"),
            "filesystem": self.filesystem,
            "landlock_abi": self.landlock_abi,
            "no_processes": "RLIMIT_NPROC=1" + (" as nobody" if self.drop else ""),
            "audit_hook": True,
        }

    # -- once, in the worker --------------------------------------------------------------------------
    def probe(self, scratch: str) -> None:
        """Try the optional steps once in a throw-away child; switch off those this system refuses
        (root in a user namespace where nobody is unmapped, a container without CAP_SETUID, ...)."""
        self.drop = self.drop and _succeeds(self._drop_to_nobody)
        if self.landlock_abi and not _succeeds(lambda: self._landlock(scratch, no_new_privs=True)):
            self.landlock_abi = 0

    def isolate_worker(self) -> None:
        """Become a subreaper; move into network and mount namespaces of our own where the kernel allows."""
        self.libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        if self._unshare(_CLONE_NEWNET | _CLONE_NEWNS):
            self.filesystem = self._private_tmp()
        elif not self._unshare(_CLONE_NEWNET):
            self.network = f"shared (unshare refused: {os.strerror(self.ctypes.get_errno())})"
            return
        self.network = "own " + ("" if self.root else "user + ") + "network namespace (no interface up)"

    def _unshare(self, flags: int) -> bool:
        """As root, unshare directly; otherwise inside a new user namespace that maps our own ids."""
        if self.root:
            return self.libc.unshare(flags) == 0
        uid, gid = os.getuid(), os.getgid()
        if self.libc.unshare(_CLONE_NEWUSER | flags) != 0:
            return False
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            try:
                Path(f"/proc/self/{name}").write_text(text)
            except OSError:
                pass
        return True

    def _private_tmp(self) -> str:
        """Cover the world-writable directories with private tmpfs mounts, seen by this worker only."""
        if self.libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
            return self.filesystem
        # A directory holding this interpreter's own libraries (a venv under /tmp) stays visible.
        libs = [os.path.realpath(p) for p in [sys.prefix, *sys.path] if p]
        covered = [d for d in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(d)
                   and not any(lib == d or lib.startswith(d + "/") for lib in libs)
                   and self.libc.mount(b"tmpfs", d.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                                       b"size=64m,mode=1777") == 0]
        return f"private tmpfs over {', '.join(covered)}" if covered else self.filesystem

    # -- every time, in the child ---------------------------------------------------------------------
    def enter(self, workdir: str, req: dict) -> None:
        import resource

        os.setsid()
        self.libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0)      # die with the worker
        os.chdir(workdir)
        cpu = math.ceil(req["timeout"]) + 1
        limits = {
            resource.RLIMIT_AS: req["address_space"],
            resource.RLIMIT_CPU: (cpu, cpu + 1),
            resource.RLIMIT_FSIZE: 16 << 20,
            resource.RLIMIT_CORE: 0,
            resource.RLIMIT_NPROC: 1,
        }
        for key, value in limits.items():
            _lower_limit(resource, key, *(value if isinstance(value, tuple) else (value, value)))
        if self.drop:
            self._drop_to_nobody()
        self.libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        self.libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
        if self.landlock_abi:
            self._landlock(workdir)
        _lower_limit(resource, resource.RLIMIT_NOFILE, 64, 64)
        os.environ.clear()
        _install_guard(os.path.realpath(workdir))

    @staticmethod
    def prepare_streams() -> None:
        """In the worker: standard streams on fds 0-2 that every child reuses after rewiring the fds."""
        import io

        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.close(null)
        sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        for fd, name in ((1, "stdout"), (2, "stderr")):
            stream = io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8",
                                      errors="backslashreplace", line_buffering=fd == 2)
            setattr(sys, name, stream)
            setattr(sys, f"__{name}__", stream)

    @staticmethod
    def wire_fds(out_fd: int, res_fd: int) -> None:
        """In the child: stdout+stderr to the output pipe, the result pipe on fd 3; close the rest."""
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.dup2(res_fd, 3)
        os.closerange(4, 1 << 16)

    def _drop_to_nobody(self) -> None:
        """uid/gid nobody, keeping CAP_DAC_READ_SEARCH only (read access to the interpreter's files)."""
        ct = self.ctypes
        self.libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0)
        os.setgroups([])
        os.setresgid(_NOBODY, _NOBODY, _NOBODY)
        os.setresuid(_NOBODY, _NOBODY, _NOBODY)
        header = (ct.c_uint32 * 2)(0x20080522, 0)            # _LINUX_CAPABILITY_VERSION_3, this process
        data = (ct.c_uint32 * 6)(1 << _CAP_DAC_READ_SEARCH, 1 << _CAP_DAC_READ_SEARCH, 0, 0, 0, 0)
        self.libc.capset(header, data)      # effective, permitted, inheritable (x2); best effort: without
                                            # it only imports from unreadable directories fail
        if os.getuid() != _NOBODY:
            raise RuntimeError("could not drop to nobody")

    def _landlock(self, workdir: str, no_new_privs: bool = False) -> None:
        """Read under the Python installation and system libraries; write only in ``workdir``; no TCP."""
        ct, abi = self.ctypes, self.landlock_abi
        if no_new_privs:
            self.libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        fs_all = (1 << _LL_FS_BITS_BY_ABI.get(abi, 16)) - 1
        attr = (ct.c_uint64 * 3)(fs_all, 0b11 if abi >= 4 else 0, _LL_SCOPE_ALL if abi >= 6 else 0)
        size = 8 if abi < 4 else 16 if abi < 6 else 24
        ruleset = self.libc.syscall(_LL_CREATE, attr, size, 0)
        if ruleset < 0:
            raise RuntimeError(f"landlock_create_ruleset: {os.strerror(ct.get_errno())}")
        rules = [(p, _LL_FS_READ) for p in self.read_roots]
        rules += [(os.devnull, _LL_FS_FILE), (workdir, fs_all)]
        for path, access in rules:
            self._landlock_rule(ruleset, path, access & fs_all)
        if self.libc.syscall(_LL_RESTRICT, ruleset, 0) != 0:
            raise RuntimeError(f"landlock_restrict_self: {os.strerror(ct.get_errno())}")
        os.close(ruleset)

    def _landlock_rule(self, ruleset: int, path: str, access: int) -> None:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return
        if not os.path.isdir(path):
            access &= _LL_FS_FILE
        rule = struct.pack("=Qi", access, fd)                 # struct landlock_path_beneath_attr (packed)
        self.libc.syscall(_LL_ADD_RULE, ruleset, 1, rule, 0)
        os.close(fd)


def _succeeds(step) -> bool:
    """Whether ``step`` runs without an exception in a forked child (the caller is left unchanged)."""
    pid = os.fork()
    if pid == 0:
        try:
            step()
        except BaseException:
            os._exit(1)
        os._exit(0)
    return os.waitpid(pid, 0)[1] == 0


def _lower_limit(resource, key: int, soft: int, hard: int) -> None:
    """Set a limit without ever trying to raise the current hard limit (refused even to root here)."""
    current = resource.getrlimit(key)[1]
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    resource.setrlimit(key, (soft, hard))


def _read_roots() -> list[str]:
    """Directories a snippet may read: the interpreter, its libraries and the system's shared libraries."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    roots.update(p for p in sys.path if p and os.path.isdir(p))
    roots.update(("/usr", "/lib", "/lib64", "/etc/ld.so.cache", "/etc/localtime", "/dev/urandom"))
    roots = sorted(os.path.realpath(r) for r in roots if os.path.isabs(r) and os.path.exists(r))
    return [r for r in roots if not any(r.startswith(other + "/") for other in roots)]   # outermost only


def _install_guard(workdir: str) -> None:
    """In-process audit hook: a second line behind the operating system's limits."""
    forbidden = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                 "os.fork", "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill")
    mutating = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link",
                "os.chmod", "os.chown", "os.truncate", "os.utime", "shutil.")
    realpath, devnull, sep = os.path.realpath, os.devnull, os.sep

    def inside(path) -> bool:
        if isinstance(path, int):
            return True
        full = realpath(os.fsdecode(path))
        return full == workdir or full.startswith(workdir + sep) or full == devnull

    def hook(event: str, args: tuple) -> None:
        if event.startswith(forbidden):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and args[0] is not None and _writes(args[1], args[2]) and not inside(args[0]):
            raise PermissionError("sandbox: writing outside the working directory is not allowed")
        if event.startswith(mutating) and any(not inside(a) for a in args[:2] if isinstance(a, (str, bytes))):
            raise PermissionError(f"sandbox: {event} outside the working directory is not allowed")

    sys.addaudithook(hook)


def _writes(mode, flags) -> bool:
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return bool((flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))


# =====================================================================================================
# The worker: a warm interpreter reading requests on stdin and answering on stdout, one child each.
# =====================================================================================================

def _send(fd: int, obj) -> None:
    data = json.dumps(obj).encode()
    _write_all(fd, struct.pack(">I", len(data)) + data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _recv(fd: int):
    (size,) = struct.unpack(">I", _read_exact(fd, 4))
    return json.loads(_read_exact(fd, size))


def _read_exact(fd: int, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("sandbox worker closed its pipe")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _worker_main() -> None:
    """Entry point of a worker process (started by :class:`SandboxPool`)."""
    import gc
    import importlib
    import shutil

    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    proto_in, proto_out = os.dup(0), os.dup(1)
    _Confinement.prepare_streams()
    box = _Confinement()
    box.isolate_worker()
    base = _scratch_base()
    box.probe(base)
    gc.collect()
    gc.freeze()                                               # fewer copy-on-write pages per fork
    _send(proto_out, {"isolation": box.report(), "scratch": base})
    try:
        while True:
            try:
                req = _recv(proto_in)
            except EOFError:
                return
            _warm_up(req["code"])
            _send(proto_out, _run_child(req, box, base))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _scratch_base() -> str:
    """The worker's directory for snippet directories (no `tempfile`: it would import `random`)."""
    for parent in ("/tmp", "/var/tmp", "/dev/shm", os.getcwd()):
        path = os.path.join(parent, f"echochamber-sandbox-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            os.mkdir(path, 0o711)
        except OSError:
            continue
        os.chmod(path, 0o711)                                 # children (nobody) may pass through
        return path
    raise RuntimeError("no writable directory for the sandbox")


def _warm_up(code: str) -> None:
    """Import a heavy library into the worker the first time a snippet uses it, so children find it
    loaded (importing sympy in every child costs 0.3 s; keeping it in every worker slows every fork)."""
    import gc
    import importlib

    for name in _ON_DEMAND:
        if name in code and name not in sys.modules:
            try:
                importlib.import_module(name)
            except ImportError:
                continue
            gc.collect()
            gc.freeze()


def _run_child(req: dict, box: _Confinement, base: str) -> dict:
    """Fork one child for one snippet, collect its output and result, then leave nothing behind."""
    workdir = _fresh_dir(base)
    if box.drop:
        os.chown(workdir, _NOBODY, _NOBODY)
    req["address_space"] = _address_space() + (req["memory_mb"] << 20)
    out_r, out_w = os.pipe()
    res_r, res_w = os.pipe()
    start = time.monotonic()
    try:
        pid = os.fork()
    except OSError as exc:                                    # the machine is out of processes
        for fd in (out_r, out_w, res_r, res_w):
            os.close(fd)
        _remove_dir(workdir)
        return {"ok": False, "value": None, "stdout": "", "error": f"could not fork: {exc}", "seconds": 0.0}
    if pid == 0:
        _child_main(req, workdir, out_w, res_w, box)
    os.close(out_w)
    os.close(res_w)
    try:
        out, res, stopped = _collect(out_r, res_r, start + req["timeout"], req["max_output"])
    finally:
        os.close(out_r)
        os.close(res_r)
        _kill_group(pid)
        _, status = os.waitpid(pid, 0)
        _reap_orphans()
        _remove_dir(workdir)
    seconds = time.monotonic() - start
    return _verdict(out, res, status, stopped, req, seconds)


_serial = iter(range(1 << 62))


def _fresh_dir(base: str) -> str:
    path = os.path.join(base, str(next(_serial)))
    os.mkdir(path, 0o700)
    return path


def _remove_dir(path: str) -> None:
    import shutil

    try:
        os.rmdir(path)                                       # the usual case: the snippet wrote nothing
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def _address_space() -> int:
    """The worker's current virtual size: the child's memory limit is counted on top of it."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _collect(out_r: int, res_r: int, deadline: float, max_output: int) -> tuple[bytes, bytes, str | None]:
    """Read both pipes until the child closes them; stop early ("timeout", "output") past a limit."""
    import select

    data = {out_r: bytearray(), res_r: bytearray()}
    cap = {out_r: max_output * 4 + 4, res_r: max_output * 6 + 16384}   # bytes (JSON escapes: 6 a character)
    poller = select.poll()
    for fd in data:
        poller.register(fd, select.POLLIN)
    open_fds = 2
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(data[out_r]), bytes(data[res_r]), "timeout"
        for fd, _ in poller.poll(left * 1000):
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                poller.unregister(fd)
                open_fds -= 1
                continue
            data[fd] += chunk[: max(0, cap[fd] - len(data[fd]))]
            if fd == out_r and len(data[fd]) > max_output and _too_long(data[fd], max_output):
                return bytes(data[out_r]), b"", "output"
    return bytes(data[out_r]), bytes(data[res_r]), None


def _too_long(out: bytearray, max_output: int) -> bool:
    return len(out.decode("utf-8", "replace")) > max_output


def _kill_group(pid: int) -> None:
    """SIGKILL the child's process group (and the child, in case it died before setsid)."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, 9)
        except (ProcessLookupError, PermissionError):
            pass


def _reap_orphans() -> None:
    """Kill and reap whatever was reparented to this worker (it is a subreaper); usually nothing."""
    for _ in range(1000):
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return                                            # no children at all: clean
        if pid:
            continue
        for child in _children(os.getpid()):
            _kill_group(child)
        time.sleep(0.001)


def _children(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(entry))
    return found


def _verdict(out: bytes, res: bytes, status: int, stopped: str | None, req: dict, seconds: float) -> dict:
    cap = req["max_output"]
    stdout = out.decode("utf-8", "replace")[:cap]
    result = {"ok": False, "value": None, "stdout": stdout, "error": None, "seconds": round(seconds, 6)}
    try:
        parsed = json.loads(res) if res else None
    except ValueError:
        parsed = None
    if stopped == "timeout":
        result["error"] = f"timeout: killed after {req['timeout']:g} s"
    elif stopped == "output":
        result["error"] = f"output limit: killed after printing more than {cap} characters"
    elif isinstance(parsed, dict):
        result.update(ok=bool(parsed.get("ok")), value=parsed.get("value"), error=parsed.get("error"))
    elif os.WIFSIGNALED(status):
        result["error"] = f"crashed: killed by signal {_signal_name(os.WTERMSIG(status))}"
    else:
        result["error"] = f"exited with status {os.WEXITSTATUS(status)} before returning a result"
    return result


def _signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


# =====================================================================================================
# The pool (caller side).
# =====================================================================================================

class _Worker:
    """One worker process and its pipes."""

    def __init__(self, token: str):
        import subprocess

        path = [str(Path(__file__).resolve().parents[1])] + [p for p in sys.path if os.path.isabs(p)]
        boot = f"import sys; sys.path[:] = {path!r}; from echochamber.sandbox import _worker_main; _worker_main()"
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
        fresh = [_Worker(self.token) for _ in range(count - len(self._workers))]
        for worker in fresh:
            self.isolation = worker.hello()
        self._workers.extend(fresh)

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        fresh = _Worker(self.token)
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
