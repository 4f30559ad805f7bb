"""The worker interpreter (started by :class:`~echochamber.sandbox.pool.SandboxPool`): its loop and the
pipe protocol, one forked child per snippet, and what that child does. Runs in the worker and its
children only; imports nothing of the pool."""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from pathlib import Path

from echochamber.sandbox.confinement import _NOBODY, _Confinement

# Imported into every worker before it forks. Not `random`, `statistics` or `threading`: their at-fork
# handlers would triple the cost of every fork.
_PRELOAD = ("ast", "io", "resource", "signal", "math", "cmath", "fractions", "decimal", "itertools",
            "functools", "collections", "datetime", "re", "string", "operator", "ctypes")
_ON_DEMAND = ("sympy", "numpy")  # imported into a worker when a snippet first mentions them


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


def _worker_main(context: dict | None = None) -> None:
    """Entry point of a worker process (started by :class:`SandboxPool`). ``context``: the caller's
    private places (``avoid``: working directory, home, project) and whether to use Landlock."""
    import gc
    import importlib
    import shutil

    context = context or {}
    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    proto_in, proto_out = os.dup(0), os.dup(1)
    _Confinement.prepare_streams()
    box = _Confinement(avoid=context.get("avoid", ()), landlock=context.get("landlock", True))
    box.narrow_import_path()
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

