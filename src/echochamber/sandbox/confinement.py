"""Operating-system confinement, prepared once per worker and entered by every child: rlimits, dropping
to ``nobody``, network and mount namespaces, Landlock, and the in-process audit-hook guard."""

from __future__ import annotations

import math
import os
import struct
import sys
from pathlib import Path

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
