"""Running a ``kdm`` command in N processes under torchrun, from inside a stage.

The pairs and student stages of the cifar10 recipe (pipeline/recipes/) run in the
stage's own process when one process is asked for; with N > 1 they start

    python -m torch.distributed.run --standalone --nproc_per_node=N -m pipeline.cli <command> ...

as a subprocess (the commands already shard their work over torchrun's RANK / WORLD_SIZE: pair shards,
DDP for training), forward its output line by line, and read the committed artifact afterwards, as the
in-process path does. On 'cuda' each process takes one GPU (LOCAL_RANK): asking for more processes than
there are visible GPUs is an error before anything starts. On 'cpu' the N processes talk over gloo (the
tests run the multi-process path this way).
"""
from __future__ import annotations

import collections
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from pipeline.errors import KDMError

REPO = Path(__file__).resolve().parents[2]
TAIL_LINES = 40   # lines of the command's output repeated in the error when it fails


def check_processes(nproc: int, device: str, what: str) -> None:
    """``nproc`` processes on ``device`` ('cpu' | 'cuda') are possible here: nproc >= 1, and on cuda at most
    the number of visible GPUs (torch.cuda.device_count())."""
    if nproc < 1:
        raise KDMError(f"{what}: gpus must be >= 1, got {nproc}")
    if device == "cuda" and nproc > 1:
        import torch
        visible = torch.cuda.device_count()
        if nproc > visible:
            raise KDMError(f"{what}: gpus={nproc} asks for {nproc} GPUs but {visible} "
                           f"{'is' if visible == 1 else 'are'} visible (torch.cuda.device_count()); set gpus <= "
                           f"{visible} or run the stage on a worker with {nproc} GPUs")
    elif device not in ("cpu", "cuda"):
        raise KDMError(f"{what}: device must be 'cpu' or 'cuda' with several processes, got {device!r}")


def torchrun_command(nproc: int, cli_args: Sequence[str]) -> list[str]:
    """The argv that runs ``kdm <cli_args>`` in ``nproc`` processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "pipeline.cli", *cli_args]


def run_torchrun(nproc: int, device: str, cli_args: Sequence[str], what: str,
                 echo: Optional[Callable[[str], None]] = None) -> None:
    """Run ``kdm <cli_args>`` in ``nproc`` processes (torchrun) and wait for it.

    Every output line (stdout and stderr of all processes) goes to ``echo`` (default: this process's
    stdout) as it comes. A non-zero exit is a KDMError naming the command, the exit code and the last
    lines of its output. ``what`` names the caller in errors (e.g. 'pairs stage').
    """
    check_processes(nproc, device, what)
    cmd = torchrun_command(nproc, cli_args)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID", "GROUP_RANK"):
        env.pop(key, None)   # a stage started from inside another torchrun job gets its own group
    out = echo or (lambda line: print(line, flush=True))
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    text = shlex.join(cmd)
    try:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", bufsize=1)
    except OSError as e:
        raise KDMError(f"{what}: could not start `{text}`: {e}") from None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            out(line)
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if rc != 0:
        last = "\n".join(tail)
        raise KDMError(f"{what}: `{text}` failed with exit code {rc}; its last output:\n{last}")


def run_kdm_command(nproc: int, device: str, cli_args: Sequence[str], config: dict, what: str,
                    quiet: bool = True) -> None:
    """``run_torchrun`` of ``kdm <cli_args> --config FILE``, ``config`` written as that JSON file."""
    import json
    import tempfile
    check_processes(nproc, device, what)
    with tempfile.TemporaryDirectory(prefix="kdm-stage-") as d:
        path = Path(d, "config.json")
        path.write_text(json.dumps(config, indent=2))
        run_torchrun(nproc, device, [*cli_args, "--config", str(path)] + (["-q"] if quiet else []), what)
