"""Resumable training runs: atomic checkpoint directories, the metrics log, the run-directory claim.

Shared by the 2-D student trainer (pipeline.training.train2d), the image engine (pipeline.training.image_train) and the EDM
teacher trainer (pipeline.teachers.bootstrap). Inside a run directory:

  <config file>                  the run's version and config, written by the first session (``claim_run``)
  metrics.jsonl                  one JSON record per logged step (``MetricsLog``, ``read_metrics``,
                                 ``truncate_metrics``)
  checkpoints/step-NNNNNNNN/     ``<name>.safetensors`` per module, ``<name>.pt`` per torch-saved object
                                 (optimizer and RNG states), and ``state.json`` (the step and any extras)

A checkpoint is written under ``checkpoints/.tmp-step-NNNNNNNN``, ``state.json`` last, and renamed into
place, so a kill never leaves a torn checkpoint; only a ``step-*`` directory holding ``state.json`` counts
as complete. ``state.json`` also records the size and sha256 of every other file (key ``_files``): a
checkpoint damaged later (a truncated or altered file) is set aside as ``.damaged-step-NNNNNNNN`` with a
warning and the run resumes from the previous complete one. The newest ``keep`` checkpoints are kept.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.storage import artifacts
from pipeline.storage.artifacts import CKPT_DIR, METRICS_FILE  # noqa: F401 (METRICS_FILE: re-exported)

STATE_FILE = "state.json"
FILES_KEY = "_files"          # state.json: {file name: [size, sha256]} of the checkpoint's other files
log = logging.getLogger("kdm.checkpoints")


# --- checkpoint directories ----------------------------------------------------------------------

def checkpoint_path(run: Path, step: int) -> Path:
    return run / CKPT_DIR / f"step-{step:08d}"


def pending_path(run: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before it is renamed into place."""
    return run / CKPT_DIR / f".tmp-step-{step:08d}"


def latest_checkpoint(run: Path) -> Optional[Path]:
    """The newest complete and intact checkpoint of ``run``, or None.

    A newer checkpoint that fails its check (``checkpoint_problem``) is renamed ``.damaged-step-N`` (out of
    the way of resuming and pruning) with a warning naming the file, and the previous one is tried.
    """
    ck = run / CKPT_DIR
    if not ck.is_dir():
        return None
    done = sorted(p for p in ck.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).exists())
    for p in reversed(done):
        problem = checkpoint_problem(p)
        if problem is None:
            return p
        aside = p.with_name(".damaged-" + p.name)
        if aside.exists():
            aside = p.with_name(f".damaged-{p.name}-{os.getpid()}")
        try:
            os.replace(p, aside)
        except OSError:   # already set aside by another process of the same run (one per GPU)
            pass
        msg = (f"checkpoint {p} is damaged ({problem}); it was moved to {aside.name} and the run resumes from "
               + ("the previous checkpoint" if p is not done[0] else "the start (no older checkpoint)"))
        log.warning(msg)
    return None


def _sha256(path: Path) -> str:
    return artifacts.sha256_file(str(path))


def checkpoint_problem(ck: Path) -> Optional[str]:
    """Why checkpoint ``ck`` cannot be resumed from, or None when it is intact: each file recorded in
    ``state.json`` has its size and sha256; older checkpoints (no record): each ``.safetensors`` header
    covers the file and each ``.pt`` is a readable zip archive."""
    try:
        state = json.loads((ck / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} is unreadable: {e}"
    if not isinstance(state, dict) or "step" not in state:
        return f"{STATE_FILE} holds no step"
    files = state.get(FILES_KEY)
    if files is not None:
        for name, (size, digest) in sorted(files.items()):
            f = ck / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} bytes, {size} were written"
            if _sha256(f) != digest:
                return f"{name} does not match the sha256 recorded when it was written"
        return None
    for f in sorted(ck.iterdir()):
        try:
            if f.suffix == ".safetensors":
                from safetensors import safe_open
                with safe_open(str(f), framework="pt") as st:
                    st.keys()
            elif f.suffix == ".pt":
                with zipfile.ZipFile(f) as z:
                    z.infolist()
        except Exception as e:
            return f"{f.name} is unreadable ({str(e).splitlines()[0][:100]})"
    return None


def save_weights(module: nn.Module, path: Path) -> None:
    """A module's state dict as safetensors (CPU, contiguous)."""
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(path))


def begin_checkpoint(run: Path, step: int) -> Path:
    """An empty pending directory for the checkpoint of ``step`` (a leftover one is cleared)."""
    tmp = pending_path(run, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_checkpoint_files(path: Path, state: dict, modules: Mapping[str, nn.Module] = {},
                           objects: Mapping[str, Any] = {}) -> None:
    """``<name>.safetensors`` per module, ``<name>.pt`` per object, then ``state.json``, which marks the
    directory complete."""
    for name, module in modules.items():
        save_weights(module, path / f"{name}.safetensors")
    for name, obj in objects.items():
        try:
            torch.save(obj, path / f"{name}.pt")
        except RuntimeError as e:   # torch's zip writer reports a full disk as "unexpected pos ..."
            free = shutil.disk_usage(path).free
            why = (f"No space left on device ({free} bytes free)" if free < (1 << 20) else
                   f"torch.save failed ({str(e).splitlines()[0][:120]})")
            raise OSError(28 if free < (1 << 20) else 5, f"{why} while writing a checkpoint",
                          str(path / f"{name}.pt")) from e
    files = {f.name: [f.stat().st_size, _sha256(f)] for f in sorted(path.iterdir())
             if f.is_file() and f.name != STATE_FILE}
    (path / STATE_FILE).write_text(json.dumps({**state, FILES_KEY: files}))


def commit_checkpoint(run: Path, step: int, keep: int) -> Path:
    """Rename the pending checkpoint of ``step`` into place and remove all but the newest ``keep``."""
    final = checkpoint_path(run, step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(pending_path(run, step), final)
    olds = sorted(p for p in (run / CKPT_DIR).iterdir() if p.name.startswith("step-"))
    for p in olds[:-keep]:
        shutil.rmtree(p)
    return final


def save_checkpoint(run: Path, step: int, keep: int, modules: Mapping[str, nn.Module],
                    objects: Mapping[str, Any] = {}, state: Optional[dict] = None) -> Path:
    """Write the checkpoint of ``step`` atomically (one process): modules, objects, and
    ``state.json`` = {"step": step, **state}."""
    tmp = begin_checkpoint(run, step)
    write_checkpoint_files(tmp, {"step": step, **(state or {})}, modules, objects)
    return commit_checkpoint(run, step, keep)


def load_modules(ck: Path, modules: Mapping[str, nn.Module], device) -> None:
    """Load ``<name>.safetensors`` of checkpoint ``ck`` into each module, onto ``device``."""
    for name, module in modules.items():
        module.load_state_dict(load_file(str(ck / f"{name}.safetensors"), device=str(device)))


def load_object(ck: Path, name: str, map_location=None) -> Any:
    """The torch-saved ``<name>.pt`` of checkpoint ``ck`` (tensors and plain containers only)."""
    return torch.load(ck / f"{name}.pt", map_location=map_location, weights_only=True)


def load_checkpoint(ck: Path, device, modules: Mapping[str, nn.Module],
                    optimizers: Mapping[str, torch.optim.Optimizer] = {}) -> dict:
    """Restore a trainer from checkpoint ``ck`` (the counterpart of ``save_checkpoint``): each module from
    ``<name>.safetensors`` and each optimizer from ``<name>.pt``, onto ``device``; returns ``state.json``."""
    load_modules(ck, modules, device)
    for name, opt in optimizers.items():
        opt.load_state_dict(load_object(ck, name, map_location=device))
    return read_state(ck)


def read_state(ck: Path) -> dict:
    """``state.json`` of checkpoint ``ck``: the step and the trainer's extras (without the file record)."""
    state = json.loads((ck / STATE_FILE).read_text())
    state.pop(FILES_KEY, None)
    return state


# --- metrics log ---------------------------------------------------------------------------------

def read_metrics(path: Path | str) -> list[dict]:
    """The complete records of a metrics file (a local path or an artifact URL); a line torn by a kill
    mid-write is skipped."""
    if isinstance(path, Path):
        if not path.exists():
            return []
        text = path.read_text()
    else:
        from pipeline.storage import artifacts
        try:
            text = artifacts.read_bytes(path).decode()
        except FileNotFoundError:
            return []
    records = []
    for ln in text.splitlines():
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records after ``step`` (logged after the checkpoint a run resumes from) and torn lines."""
    if not path.exists():
        return
    path.write_text("".join(json.dumps(r) + "\n" for r in read_metrics(path) if r["step"] <= step))


def last_losses(path: Path) -> dict[str, float]:
    """The ``loss_*`` values of the last record (prefix removed); {} when nothing was logged."""
    records = read_metrics(path)
    if not records:
        return {}
    return {k.removeprefix("loss_"): v for k, v in records[-1].items() if k.startswith("loss_")}


class MetricsLog:
    """The metrics log of a run being trained, from ``step`` on (the step it starts or resumes at).

    Opening drops the records a killed session logged after that step (``truncate_metrics``). ``record``
    makes {"step", **fields, "<rate_name>", "elapsed_s"}: the samples per second since the previous
    record (``batch_size`` per step) and the seconds since opening (``t_start``); ``write`` appends it as
    one flushed JSON line. With ``write=False`` (a process that does not write, under DDP) records are
    made but the file is neither truncated nor written.

    Steady-state rate (``record(..., steady=...)``): ``"train_<rate_name>"`` is the rate of the interval's
    training steps alone: the time spent in ``with log.exclude():`` blocks (checkpoint writes, hooks) and in
    the ``probes`` is left out, and an interval that began before the loop was steady (warm-up: cuDNN
    autotuning, compilation, CUDA-graph capture) gets None. ``steady_rate`` is the rate over all steady
    intervals of this session (their samples over their training seconds), the figure comparable with a
    benchmark's mean time per step after warm-up. ``probes`` are called with the interval's step count and
    return extra fields of each record (``pipeline.training.monitor``: GPU clocks, host CPU time).
    """

    def __init__(self, path: Path, step: int, batch_size: int, write: bool = True,
                 rate_name: str = "pairs_per_s", probes: Sequence[Callable[[int], Mapping[str, Any]]] = ()):
        self.batch_size, self.rate_name = batch_size, rate_name
        self.probes = list(probes)
        self._file = None
        if write:
            truncate_metrics(path, step)
            self._file = path.open("a")
        self.t_start = self._t_last = time.time()
        self._last_step = step
        self._excluded = 0.0
        self.steady_samples, self.steady_seconds = 0, 0.0

    @contextmanager
    def exclude(self, sync: Optional[Callable[[], None]] = None):
        """Time spent inside is not training time (``train_<rate>``). ``sync`` (e.g. a device synchronise)
        runs first, so that queued training work is not counted as excluded."""
        if sync is not None:
            sync()
        t = time.time()
        try:
            yield
        finally:
            self._excluded += time.time() - t

    @property
    def steady_rate(self) -> Optional[float]:
        """Samples per second over the steady intervals recorded so far; None before the first one."""
        return self.steady_samples / self.steady_seconds if self.steady_seconds > 0 else None

    def record(self, step: int, fields: Mapping[str, Any], steady: Optional[bool] = None) -> dict:
        now = time.time()
        n = step - self._last_step
        rec = {"step": step, **fields,
               self.rate_name: n * self.batch_size / max(now - self._t_last, 1e-9),
               "elapsed_s": now - self.t_start}
        if steady is not None:
            train_s = now - self._t_last - self._excluded
            rate = None
            if steady and n > 0 and train_s > 0:
                rate = n * self.batch_size / train_s
                self.steady_samples += n * self.batch_size
                self.steady_seconds += train_s
            rec[f"train_{self.rate_name}"] = rate
        for probe in self.probes:
            rec.update(probe(n))
        self._excluded = time.time() - now      # the probes' time falls into the next interval: not training
        self._t_last, self._last_step = now, step
        return rec

    def write(self, rec: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(rec) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- run directory -------------------------------------------------------------------------------

def claim_run(config_file: Path, version: str, config: dict, holds: str,
              hint: str = "choose another --out to start a new run") -> None:
    """Write ``{"version": version, **config}`` to ``config_file`` on the first call; later calls check
    that the run there is of ``version`` and raise ArtifactExists ("<holds> (version ..., this is ...);
    <hint>") when it is not. A directory that holds anything but a run (a pair store, another artifact,
    unrelated files) is refused: a run never writes into it."""
    run = config_file.parent
    if not artifacts.check_run_version(config_file, version, holds, hint):
        run.mkdir(parents=True, exist_ok=True)
        config_file.write_text(json.dumps({"version": version, **config}, indent=2) + "\n")
