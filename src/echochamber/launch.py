"""How the training jobs start: ``accelerate launch`` arguments for pretraining and RL.

Pretraining passes :func:`launch_args` to ``accelerate launch`` (it picks its device itself). An RL job
starts with ``python -m echochamber.launch ... SCRIPT ARGS``, which decides on the node that runs it
whether a GPU is there (``--cpu`` otherwise) and then replaces itself with ``accelerate launch``; a job
of one process runs the script in this interpreter instead: ``Accelerator`` makes a single-process state
by itself and the script sets its own precision and threads, so the launcher would only add two
interpreter start-ups.
Nothing here imports torch at module level, so the workflow can import it cheaply.
"""

from __future__ import annotations

import argparse
import os
import sys
import zlib


def job_processes(resources) -> int:
    """Processes to launch for a job: one per GPU when the job holds GPUs (resource ``gpu``: pretrain.gpus,
    or a ``--set-resources pretrain:gpu=N`` override), else the ``processes`` resource."""
    gpu = int(getattr(resources, "gpu", 0) or 0)
    return gpu if gpu > 0 else int(resources.processes)


def launch_args(n_processes: int) -> str:
    """Pretraining's ``accelerate launch`` flags for a process count.

    Several processes go through torchrun (``--multi_gpu``, on a free port): on CPU, accelerate's
    ``--cpu`` launcher starts a single process unless mpirun is installed, so the training script picks
    the device itself (gloo on CPU, NCCL on GPUs).
    """
    args = f"--num_machines 1 --num_processes {int(n_processes)} --mixed_precision no --dynamo_backend no"
    if n_processes > 1:
        args += " --multi_gpu --main_process_port 0"
    return args


def port_for(cell_id: str) -> int:
    """A rendezvous port per RL cell, so that cells sharing a node do not collide."""
    return 29500 + zlib.crc32(cell_id.encode()) % 2000


def rl_command(script: str, script_args: list[str], *, processes: int, port: int, precision: str,
               cuda: bool) -> list[str]:
    """The ``accelerate launch`` command line of an RL job (``--cpu`` where the node has no GPU)."""
    return [sys.executable, "-m", "accelerate.commands.launch", *([] if cuda else ["--cpu"]),
            "--num_machines", "1", "--num_processes", str(int(processes)), "--main_process_port", str(int(port)),
            "--mixed_precision", "bf16" if precision == "bf16" else "no", "--dynamo_backend", "no",
            script, *script_args]


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> None:
    """``python -m echochamber.launch --processes N --port P --precision fp32 SCRIPT [ARGS...]``"""
    ap = argparse.ArgumentParser(description="Start an RL job under accelerate, on the GPUs of this node if any.")
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--port", type=int, default=29500)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("script")
    ap.add_argument("script_args", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    if a.processes == 1:  # no launcher needed (module docstring)
        import runpy

        sys.argv = [a.script, *a.script_args]
        runpy.run_path(a.script, run_name="__main__")  # its sys.exit ends this process with its status
        return
    cmd = rl_command(a.script, a.script_args, processes=a.processes, port=a.port, precision=a.precision,
                     cuda=cuda_available())
    sys.stdout.flush()
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
