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
- Landlock (where the kernel has it): writes only inside the child's fresh temporary directory; reads
  only of the interpreter, its standard library, the packages snippets may import (``confinement.PACKAGES``)
  and system libraries, found from where they live, never from the caller's ``sys.path``, working directory,
  home or project; no TCP, no signals to processes outside;
- an in-process audit hook (a second line, not the boundary; the only limit on reads without Landlock):
  no sockets, subprocesses, fork, exec, kill, file writes outside the directory, or reads and listings
  outside what Landlock would allow;
- an empty environment, stdin from /dev/null, stdout and stderr captured up to ``max_output`` (a child
  that prints more is killed).

Each optional layer is probed when a worker starts; :func:`isolation_report` says which are active, and
the pool logs it once per process (``echochamber.sandbox``), with a warning where reads are not confined.
docs/sandbox.md: the layers, what a snippet can read, and what happens without Landlock.

Whatever the snippet does (``exit()``, ``os._exit``, a segfault, ignoring signals, a C-level endless
computation), the caller gets a :class:`SandboxResult`; a worker that dies anyway is replaced.

The package's modules, by the process each part runs in:

- ``pool``: the caller's side: :class:`SandboxPool`, which starts and replaces the workers and hands
  them snippets, :class:`SandboxResult`, and the shared pool (:func:`default_pool`, :func:`run_snippet`,
  :func:`isolation_report`);
- ``worker``: the worker interpreter's side: its loop and the pipe protocol, forking one child per
  snippet and collecting its output and verdict, and what the child does (evaluate, render, answer);
- ``confinement``: the operating-system layers a worker prepares once and every child enters.

Names are re-exported here lazily: a worker imports ``echochamber.sandbox.worker`` only, not the pool.
"""

from __future__ import annotations

__all__ = ["MAX_CODE", "MODES", "ReadsNotConfined", "SandboxPool", "SandboxResult", "default_pool", "isolation_report",
           "run_snippet"]
_LAZY = {name: "echochamber.sandbox.pool" for name in [*__all__, "_WORKER_TAG"]}


def __getattr__(name: str):
    """``from echochamber.sandbox import SandboxPool``: imports the pool on first use."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
