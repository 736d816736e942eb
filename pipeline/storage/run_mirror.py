"""A training run directory kept on local disk and mirrored to an artifact URL on object storage.

Training writes a local run directory (pipeline.storage.checkpoints' layout); when the run's artifact URL is
remote (``s3://bucket/prefix/students/<version>``) this mirror keeps ``<url>.partial`` up to date:

  <url>.partial/config.json, metrics.jsonl      pushed with every checkpoint (metrics first)
  <url>.partial/checkpoints/step-NNNNNNNN/      each committed local checkpoint, ``state.json`` last, so
                                                only a checkpoint holding ``state.json`` is complete;
                                                the newest ``keep`` complete ones are kept
A run restarted anywhere pulls the config, the metrics log and the newest complete checkpoint into a
fresh local directory and resumes from it. When training ends the weights and ``manifest.json`` (last)
are pushed and ``pipeline.storage.artifacts.commit`` copies ``.partial`` to the final URL, the manifest last.
Every upload is verified (``artifacts.put_file``: the size and sha256 the store holds), so a store that keeps a
short body never gets a manifest naming it.

Credentials and endpoints reach the file system only through the standard environment (see
``pipeline.storage.artifacts.url_to_fs``); nothing here logs them.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

from pipeline.errors import KDMError
from pipeline.storage import artifacts
from pipeline.storage.checkpoints import CKPT_DIR, METRICS_FILE, STATE_FILE, checkpoint_problem, log


def _step_of(name: str) -> int:
    return int(name.removeprefix("step-"))


class RunMirror:
    """The remote copy (``<out>.partial``) of a run directory whose artifact URL is ``out``."""

    def __init__(self, out: str, run_files: Iterable[str] = ("config.json", METRICS_FILE)):
        self.out = out
        self.url = artifacts.partial_url(out)
        self.fs, self.path = artifacts.url_to_fs(self.url)
        self.run_files = tuple(run_files)

    def _remote(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])

    def _put(self, local: Path, *parts: str) -> None:
        artifacts.put_file(self.fs, local, self._remote(*parts), artifacts.join(self.url, *parts))

    def complete_checkpoints(self) -> list[str]:
        """Names (``step-NNNNNNNN``) of the complete remote checkpoints, oldest first."""
        ck = self._remote(CKPT_DIR)
        self.fs.invalidate_cache(self.path)
        if not self.fs.exists(ck):
            return []
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(ck, detail=False))
        return [n for n in names if n.startswith("step-") and self.fs.exists(f"{ck}/{n}/{STATE_FILE}")]

    def pull(self, run: Path) -> Optional[int]:
        """Download the run files and the newest complete checkpoint into the local directory ``run``;
        returns that checkpoint's step (None when the remote run has none). A transport or permission error
        is a KDMError that says so (the remote run is intact: rerun)."""
        try:
            return self._pull(run)
        except KDMError:
            raise
        except Exception as e:
            err = artifacts.transport_error(self.url, e)
            if err is None:
                raise
            raise err from None

    def _pull(self, run: Path) -> Optional[int]:
        run.mkdir(parents=True, exist_ok=True)
        self.fs.invalidate_cache(self.path)
        for name in self.run_files:
            if self.fs.exists(self._remote(name)):
                self.fs.get_file(self._remote(name), str(run / name))
        for name in reversed(self.complete_checkpoints()):
            pending = run / CKPT_DIR / f".pull-{name}"
            if pending.exists():
                shutil.rmtree(pending)
            pending.mkdir(parents=True)
            src = self._remote(CKPT_DIR, name)
            files = [f.rsplit("/", 1)[-1] for f in self.fs.find(src)]
            artifacts.io_map(lambda f: self.fs.get_file(f"{src}/{f}", str(pending / f)),
                             [f for f in files if f != STATE_FILE])
            if STATE_FILE in files:
                self.fs.get_file(f"{src}/{STATE_FILE}", str(pending / STATE_FILE))
            problem = checkpoint_problem(pending)
            if problem is not None:      # set aside remotely (out of resuming and pruning), try the previous one
                shutil.rmtree(pending)
                for f in files:
                    self.fs.copy(f"{src}/{f}", self._remote(CKPT_DIR, ".damaged-" + name, f))
                self.fs.rm(src, recursive=True)
                msg = f"checkpoint {src} is damaged ({problem}); it was moved to .damaged-{name}, trying the previous one"
                log.warning(msg)
                continue
            final = run / CKPT_DIR / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(pending, final)
            return _step_of(name)
        return None

    def push_checkpoint(self, run: Path, ck: Path, keep: int) -> None:
        """Upload the run files (the metrics log before the checkpoint, so the remote log always reaches
        the remote checkpoint's step) and the local checkpoint ``ck`` (``state.json`` last); then remove
        all but the newest ``keep`` complete remote checkpoints."""
        for name in self.run_files:
            if (run / name).exists():
                self._put(run / name, name)
        files = sorted(p for p in ck.iterdir() if p.is_file() and p.name != STATE_FILE)
        artifacts.io_map(lambda p: self._put(p, CKPT_DIR, ck.name, p.name), files)   # several at a time
        if (ck / STATE_FILE).is_file():
            self._put(ck / STATE_FILE, CKPT_DIR, ck.name, STATE_FILE)                 # state.json last
        done = self.complete_checkpoints()
        for name in done[:-keep]:
            self.fs.rm(self._remote(CKPT_DIR, name), recursive=True)

    def commit(self, run: Path, final_files: Iterable[str], drop_checkpoints: bool = False) -> None:
        """Upload the run files and ``final_files`` (in order; the manifest last) of the finished local
        run, remove the remote checkpoints when ``drop_checkpoints`` (artifacts that keep none), then
        commit ``<out>.partial`` to ``out``."""
        for name in [*self.run_files, *final_files]:
            self._put(run / name, name)
        ck = self._remote(CKPT_DIR)
        self.fs.invalidate_cache(self.path)
        if drop_checkpoints and self.fs.exists(ck):
            self.fs.rm(ck, recursive=True)
        artifacts.commit(self.out)
