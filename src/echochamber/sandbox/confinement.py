"""Operating-system confinement, prepared once per worker and entered by every child: rlimits, dropping
to ``nobody``, network and mount namespaces, Landlock, and the in-process audit-hook guard.

What a snippet may read is decided here, from where the interpreter and the importable packages live
(:func:`read_allowlist`), never from the caller's ``sys.path``, working directory or home: the standard
library, :data:`PACKAGES`, the interpreter's shared libraries and the system's. docs/sandbox.md has the
layers and what happens without Landlock.
"""

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
_LL_FS_READ_DIR = 1 << 3                                        # list a directory (not read its files)
_LL_FS_FILE = 1 << 0 | 1 << 1 | 1 << 2 | 1 << 14 | 1 << 15      # rights that apply to a file
_LL_SCOPE_ALL = 1 << 0 | 1 << 1                                 # abstract unix sockets, signals

# What snippets may import besides the standard library (sympy needs mpmath). A package that is not
# installed is left out; any other module a snippet imports is found but cannot be read.
PACKAGES = ("sympy", "mpmath", "numpy")
# The system's shared libraries (extension modules load them on import), time zones, the loader's cache.
_SYSTEM = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/share/zoneinfo", "/etc/ld.so.cache",
           "/etc/localtime", "/dev/urandom")


class _Confinement:
    """What a worker learned about its kernel, and the steps a child takes to lock itself in."""

    def __init__(self, avoid=(), landlock: bool = True):
        """``avoid``: the caller's private places (working directory, home, project); no read root may
        contain one. ``landlock=False`` leaves Landlock out (tests of the fallback)."""
        import ctypes

        self.ctypes = ctypes
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.root = os.geteuid() == 0
        self.drop = self.root                 # to nobody; off when the probe in isolate_worker fails
        self.landlock_abi = max(0, self.libc.syscall(_LL_CREATE, None, 0, 1)) if landlock else 0
        self.ruleset = -1                     # the worker's read ruleset, built once in probe()
        self.network = "shared (guard only)"
        self.filesystem = "shared /tmp"
        self.read_roots, self.listable, self.packages = read_allowlist(avoid)
        self.guard_tables = _guard_tables(self.read_roots, self.listable)    # once, not per child

    def report(self) -> dict:
        allowed = ", ".join(["the interpreter", "its standard library", *self.packages]) + " and system libraries"
        return {
            "user": "nobody (uid 65534)" if self.drop else f"uid {os.getuid()} (unchanged)",
            "network": self.network + ("" if self.network.startswith("own") else
                                       "; Landlock blocks TCP" if self.landlock_abi >= 4 else
                                       "; only the in-process guard blocks sockets (ctypes gets past it)"),
            "filesystem": self.filesystem,
            "reads": (f"Landlock: only {allowed}" if self.landlock_abi else
                      f"NOT confined by the kernel (no Landlock): only the in-process guard keeps Python-level "
                      f"reads to {allowed} (ctypes gets past it)"),
            "reads_confined": bool(self.landlock_abi),
            "writes": ("Landlock: only the snippet's own directory" if self.landlock_abi else
                       "only the in-process guard keeps writes to the snippet's own directory (ctypes gets past it)"
                       + ("" if self.filesystem == "shared /tmp" else "; /tmp is private")),
            "landlock_abi": self.landlock_abi,
            "no_processes": "RLIMIT_NPROC=1" + (" as nobody" if self.drop else ""),
            "audit_hook": True,
        }

    # -- once, in the worker --------------------------------------------------------------------------
    def probe(self, scratch: str) -> None:
        """Try the optional steps once in a throw-away child; switch off those this system refuses
        (root in a user namespace where nobody is unmapped, a container without CAP_SETUID, ...)."""
        self.drop = self.drop and _succeeds(self._drop_to_nobody)
        if self.landlock_abi:
            try:
                self.ruleset = self._read_ruleset(scratch)
            except (OSError, RuntimeError):
                self.landlock_abi = 0
        if self.landlock_abi and not _succeeds(lambda: self._landlock(scratch, no_new_privs=True)):
            self.landlock_abi = 0
        if not self.landlock_abi and self.ruleset >= 0:
            os.close(self.ruleset)
            self.ruleset = -1

    def narrow_import_path(self) -> None:
        """Keep on ``sys.path`` only what children may read or list, so that imports never even look in
        the caller's directories (the worker has imported what it needs from them)."""
        keep = lambda p: _within(p, self.read_roots) or _within(p, self.listable)    # noqa: E731
        sys.path[:] = [p for p in sys.path if p and os.path.isabs(p) and keep(os.path.realpath(p))]
        for key in [k for k in sys.path_importer_cache if not (os.path.isabs(k) and keep(os.path.realpath(k)))]:
            del sys.path_importer_cache[key]

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
        libs = [*self.read_roots, *self.listable]
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
        if self.ruleset >= 0:
            os.close(self.ruleset)
        _lower_limit(resource, resource.RLIMIT_NOFILE, 64, 64)
        os.environ.clear()
        _install_guard(os.path.realpath(workdir), self.guard_tables)

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

    def wire_fds(self, out_fd: int, res_fd: int) -> None:
        """In the child: stdout+stderr to the output pipe, the result pipe on fd 3; close the rest but the
        worker's Landlock ruleset (closed once the child has entered it)."""
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.dup2(res_fd, 3)
        if self.ruleset >= 4:
            os.closerange(4, self.ruleset)
            os.closerange(self.ruleset + 1, 1 << 16)
        else:
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

    def _fs_all(self) -> int:
        return (1 << _LL_FS_BITS_BY_ABI.get(self.landlock_abi, 16)) - 1

    def _create_ruleset(self, fs: int, net: int = 0, scope: int = 0) -> int:
        ct, abi = self.ctypes, self.landlock_abi
        attr = (ct.c_uint64 * 3)(fs, net if abi >= 4 else 0, scope if abi >= 6 else 0)
        size = 8 if abi < 4 else 16 if abi < 6 else 24
        ruleset = self.libc.syscall(_LL_CREATE, attr, size, 0)
        if ruleset < 0:
            raise RuntimeError(f"landlock_create_ruleset: {os.strerror(ct.get_errno())}")
        return ruleset

    def _read_ruleset(self, scratch: str) -> int:
        """Built once in the worker, entered by every child: read the allowlist, list the directories
        that hold it, use /dev/null, do anything under the worker's scratch directory; no TCP, no signals
        or abstract sockets outside. Its descriptor is 4 or above (the children rewire fds 0-3)."""
        import fcntl

        fs_all = self._fs_all()
        ruleset = self._create_ruleset(fs_all, net=0b11, scope=_LL_SCOPE_ALL)
        rules = [(p, _LL_FS_READ) for p in self.read_roots] + [(p, _LL_FS_READ_DIR) for p in self.listable]
        rules += [(os.devnull, _LL_FS_FILE), (scratch, fs_all)]
        for path, access in rules:
            self._landlock_rule(ruleset, path, access & fs_all)
        if ruleset < 4:
            moved = fcntl.fcntl(ruleset, fcntl.F_DUPFD_CLOEXEC, 4)
            os.close(ruleset)
            ruleset = moved
        return ruleset

    def _landlock(self, workdir: str, no_new_privs: bool = False) -> None:
        """Two Landlock layers: the worker's read ruleset, then one that handles only writes and allows
        them in ``workdir`` (and /dev/null): reads of the allowlist, writes in ``workdir``, no TCP."""
        ct = self.ctypes
        if no_new_privs:
            self.libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        if self.libc.syscall(_LL_RESTRICT, self.ruleset, 0) != 0:
            raise RuntimeError(f"landlock_restrict_self: {os.strerror(ct.get_errno())}")
        writes = self._fs_all() & ~_LL_FS_READ
        ruleset = self._create_ruleset(writes)
        try:
            self._landlock_rule(ruleset, workdir, writes)
            self._landlock_rule(ruleset, os.devnull, writes & _LL_FS_FILE)
            if self.libc.syscall(_LL_RESTRICT, ruleset, 0) != 0:
                raise RuntimeError(f"landlock_restrict_self: {os.strerror(ct.get_errno())}")
        finally:
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


def read_allowlist(avoid=()) -> tuple[list[str], list[str], list[str]]:
    """What a snippet may read, found from where things live, not from ``sys.path``: ``(roots, listable,
    packages)``. ``roots`` (read in full): the interpreter's executable, each entry of its standard
    library (not ``site-packages``), the shared libraries in its prefixes' ``lib``, the directories of
    :data:`PACKAGES` (and their bundled ``<name>.libs``), and the system's shared libraries. ``listable``
    (names only, not contents): the standard library's directory and the directories holding the
    packages, which the import system lists. No root or listable directory may contain a path of
    ``avoid`` (the caller's working directory, home, project): those are dropped."""
    import importlib.util

    real = os.path.realpath
    roots, listable, packages = set(), set(), []
    if os.path.isfile(sys.executable):
        roots.add(real(sys.executable))
    stdlib = real(os.path.dirname(os.__file__))
    listable.add(stdlib)
    roots.update(os.path.join(stdlib, e) for e in os.listdir(stdlib) if e not in ("site-packages", "dist-packages"))
    for name in ("_ctypes", "_json", "math", "select"):        # lib-dynload, where it is elsewhere
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and os.path.isfile(spec.origin):
            roots.add(os.path.dirname(real(spec.origin)))
    roots.update(real(p) for p in sys.path if p.endswith(".zip") and os.path.isfile(p)
                 and os.path.basename(p).startswith("python"))
    for prefix in {sys.base_prefix, sys.base_exec_prefix, sys.prefix}:
        lib = real(os.path.join(prefix, "lib"))
        if os.path.isdir(lib) and lib not in ("/usr/lib", "/usr/lib64", "/lib", "/lib64"):
            roots.update(os.path.join(lib, e) for e in os.listdir(lib)
                         if e.startswith("lib") and ".so" in e and os.path.isfile(os.path.join(lib, e)))
    for name in PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        places = list(spec.submodule_search_locations or []) or [spec.origin]
        for place in (real(p) for p in places if p and os.path.exists(p)):
            roots.add(place)
            listable.add(os.path.dirname(place))
            if os.path.isdir(place + ".libs"):                   # auditwheel's bundled shared libraries
                roots.add(place + ".libs")
        packages.append(name)
    roots.update(real(p) for p in _SYSTEM if os.path.exists(p))

    avoid = [real(a) for a in avoid if a]
    exposes = lambda r: any(_within(a, [r]) for a in avoid)     # noqa: E731
    roots = sorted(r for r in roots if os.path.exists(r) and not exposes(r))
    roots = [r for r in roots if not _within(os.path.dirname(r), roots)]          # outermost only
    listable = sorted(d for d in listable if os.path.isdir(d) and not exposes(d) and not _within(d, roots))
    return roots, listable, packages


def _within(path: str, places) -> bool:
    """Whether ``path`` is one of ``places`` or lies under one (all real, absolute paths)."""
    return any(path == p or path.startswith(p if p.endswith("/") else p + "/") for p in places)


def _guard_tables(roots, listable) -> tuple:
    """What the audit hook lets a child read and list, besides its own directory: (exact paths, prefixes)
    for reads, then for listings. Built once per worker."""
    sep = os.sep
    read_exact = frozenset((os.devnull, *roots))
    read_under = tuple(p.rstrip(sep) + sep for p in roots)
    return (read_exact, read_under, read_exact | frozenset(listable),
            read_under + tuple(p.rstrip(sep) + sep for p in listable))


def _install_guard(workdir: str, tables: tuple = (frozenset(), (), frozenset(), ())) -> None:
    """In-process audit hook: a second line behind the operating system's limits (the only limit on
    reads where there is no Landlock). ``tables``: from :func:`_guard_tables`. Paths must be ``str``,
    ``bytes`` or a plain ``pathlib`` path: an object could name one file to this hook and another to
    ``open``."""
    from pathlib import PosixPath

    forbidden = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                 "os.fork", "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill")
    mutating = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link",
                "os.chmod", "os.chown", "os.truncate", "os.utime", "shutil.")
    listing = ("os.listdir", "os.scandir")
    realpath, fsdecode, devnull, sep = os.path.realpath, os.fsdecode, os.devnull, os.sep
    plain = (str, bytes, PosixPath)
    readable_exact, readable_under, listable_exact, listable_under = tables
    own_under = workdir + sep

    def full(path) -> str:
        if type(path) not in plain:
            raise PermissionError("sandbox: a path must be str, bytes or pathlib.Path")
        return realpath(fsdecode(path))

    def inside(path) -> bool:
        if isinstance(path, int):
            return True
        where = full(path)
        return where == workdir or where.startswith(workdir + sep) or where == devnull

    def allowed(path, exact, under) -> bool:
        if path is None or isinstance(path, int):
            return True
        where = full(path)
        return where == workdir or where.startswith(own_under) or where in exact or where.startswith(under)

    def hook(event: str, args: tuple) -> None:
        if event.startswith(forbidden):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and args[0] is not None:
            if _writes(args[1], args[2]):
                if not inside(args[0]):
                    raise PermissionError("sandbox: writing outside the working directory is not allowed")
            elif not allowed(args[0], readable_exact, readable_under):
                raise PermissionError("sandbox: reading outside the interpreter's libraries is not allowed")
        if event in listing and not allowed(args[0], listable_exact, listable_under):
            raise PermissionError("sandbox: listing outside the interpreter's libraries is not allowed")
        if event.startswith(mutating) and any(not inside(a) for a in args[:2] if isinstance(a, (str, bytes))):
            raise PermissionError(f"sandbox: {event} outside the working directory is not allowed")

    sys.addaudithook(hook)


def _writes(mode, flags) -> bool:
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return bool((flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
