"""The bad-input and fault battery of ../shared/docs/bad-input-battery.md, automated and re-runnable.

76 numbered cases (the battery's numbering): bad paths, damaged pair stores, edited manifests, bad seed
ranges and ``--set`` values, writers aimed at existing artifacts, kill-and-resume, concurrent writers,
read-only and full disks, bad image archives, teacher registration and evaluation mismatches. Every case
runs the ``kdm`` command line (``python -m pipeline.cli``) in subprocesses, as a user would, in a scratch
directory, against the repository given by ``--repo``. docs/bad-input-battery-results.md records the
commands, fixtures and damage recipes this script reproduces.

Each case is judged by explicit expectations:

* clear: an expected success exits 0 and its output check passes (values, ``--verify``, byte-identical
  weights, ...); an expected failure exits non-zero, prints no Python traceback, and its message has at
  most 2 non-empty stderr lines (a case may allow more, e.g. argparse's usage block) and holds the case's
  key words: the reason phrase (what is wrong) and, where it matters, the input it names (the path, array,
  chunk, field); key words that only repeat the command's own arguments do not make a case clear; a
  refused command leaves no output behind (else partly clear);
* traceback: "Traceback (most recent call last)" reached stdout or stderr;
* silently accepted: exit 0 where an error was expected;
* corrupted: an existing artifact changed, or a damaged store was read as data;
* partly clear: anything else (message too long, key words missing, a wrong reason, a failed check);
* not run: the case could not run here (e.g. no permission to mount a tmpfs); the row says why.

A case with several runs gets the worst verdict of its runs. After every case the fixture artifacts
(teacher, pair stores, student runs) are hashed and compared with their state before it: a change makes
the case "corrupted" (the fixture is then restored). Cases that aim writers at other existing targets
hash those too.

Examples:

  python bench/bad_input_battery.py                                   # all 76 cases, a fresh temp dir
  python bench/bad_input_battery.py --cases 1,29,51-53 --keep         # a subset; keep the scratch dir
  python bench/bad_input_battery.py --workdir /tmp/bat --json bat.json  # reuse fixtures in /tmp/bat
  python bench/bad_input_battery.py --repo /path/to/other/checkout    # test another checkout

The table goes to stdout (markdown), one progress line per case to stderr. Mount cases (61, 62) need
root; without it they are reported as not run. The exit status is 0 only when every case is clear (1
otherwise, not-run cases included). ``make test`` runs the fast subset ``--cases fast`` (FAST_CASES: the
cases that need no trained teacher or student) through tests/test_bad_input_battery.py.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TRACEBACK = "Traceback (most recent call last)"
SEVERITY = ("clear", "partly clear", "silently accepted", "traceback", "corrupted")
KILL_GEN = ("--seeds", "0-399999", "--steps", "4", "--method", "euler", "--chunk-size", "10000")
KILL_TRAIN = ("--preset", "smoke", "--set", "train.steps=3000", "--set", "train.checkpoint_every=250",
              "--set", "train.threads=1")
PROGRESS_DIR = "_kdm_progress"          # a generation's per-shard markers inside <out>.partial


class NotRun(Exception):
    """The case cannot run here; the message says why."""


# ------------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One finished (or killed) ``kdm`` invocation."""
    args: list[str]
    rc: Optional[int]            # None: killed after its timeout
    out: str
    err: str
    seconds: float
    role: str = "case"           # "case" (judged) or "setup" (a run a case kills or builds on)
    verdict: Optional[str] = None
    why: str = ""

    @property
    def command(self) -> str:
        return "kdm " + " ".join(shlex.quote(a) for a in self.args)

    @property
    def traceback(self) -> bool:
        return TRACEBACK in self.out or TRACEBACK in self.err

    def lines(self, usage: bool = False) -> list[str]:
        """Non-empty stderr lines; ``usage``: without argparse's leading usage block."""
        lines = [ln for ln in self.err.splitlines() if ln.strip()]
        if usage and lines and lines[0].startswith("usage:"):
            lines = lines[1:]
            while lines and lines[0].startswith(" "):
                lines = lines[1:]
        return lines

    @property
    def message(self) -> str:
        """The last stderr lines from the last "error:" line on (else the last two), or the summary line."""
        lines = self.lines(usage=True)
        starts = [i for i, ln in enumerate(lines) if "error:" in ln]
        lines = lines[starts[-1]:] if starts else lines[-2:]
        lines = lines or [ln for ln in self.out.splitlines() if ln.strip()][-1:]
        return shorten(" / ".join(ln.strip() for ln in lines), 240)

    def row(self) -> dict:
        return {"command": self.command, "role": self.role, "exit": self.rc, "traceback": self.traceback,
                "message": self.message, "message_lines": len(self.lines()), "seconds": round(self.seconds, 3),
                "verdict": self.verdict, "why": self.why, "stderr_tail": self.err[-3000:]}


def shorten(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


def has(text: str, key) -> bool:
    """``key`` (a string, or a tuple of alternatives) occurs in ``text``, ignoring case."""
    keys = key if isinstance(key, tuple) else (key,)
    return any(k.lower() in text.lower() for k in keys)


def echoed(run: Run, key) -> bool:
    """Whether every alternative of ``key`` is (part of) one of the command's arguments: such a key word
    shows that the message names its input, not that it says what is wrong."""
    keys = key if isinstance(key, tuple) else (key,)
    return all(any(k.lower() in str(a).lower() for a in run.args) for k in keys)


def error_verdict(run: Run, keys=(), max_lines: int = 2, forbid=(), usage: bool = False) -> tuple[str, str]:
    """The verdict of a run that should have failed."""
    if run.rc is None:
        return "partly clear", "no exit before the timeout (killed)"
    if run.traceback:
        return "traceback", "a Python traceback reached the user"
    if run.rc == 0:
        return "silently accepted", "exit 0 where an error was expected"
    problems = []
    lines = run.lines(usage)
    if len(lines) > max_lines:
        problems.append(f"{len(lines)} message lines (at most {max_lines})")
    text = "\n".join(lines)
    missing = [k if isinstance(k, str) else "|".join(k) for k in keys if not has(text, k)]
    if missing:
        problems.append("message lacks " + ", ".join(repr(m) for m in missing))
    if not [k for k in keys if not echoed(run, k)]:
        problems.append("no reason phrase among the key words (they only echo the command's own arguments: "
                        "an error that repeats its input without saying what is wrong would pass)")
    wrong = [f for f in forbid if has(text, f)]
    if wrong:
        problems.append("message says " + ", ".join(repr(w) for w in wrong))
    return ("partly clear", "; ".join(problems)) if problems else ("clear", "refused clearly")


def success_verdict(run: Run, problem: Optional[str], bad: str = "partly clear") -> tuple[str, str]:
    """The verdict of a run that should have succeeded; ``problem`` from its output check (None: passed),
    judged ``bad`` when set."""
    if run.rc is None:
        return "partly clear", "no exit before the timeout (killed)"
    if run.traceback:
        return "traceback", "a Python traceback reached the user"
    if run.rc != 0:
        return "partly clear", f"exit {run.rc} where success was expected"
    if problem:
        return bad, problem
    return "clear", "succeeded and its check passed"


# ------------------------------------------------------------------------------------- file helpers


def tree_hash(path: Path) -> str:
    """sha256 over the relative names and bytes of every file under ``path`` (or of the file)."""
    h = hashlib.sha256()
    if not path.exists() and not path.is_symlink():
        return "absent"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(path) if p != path else p.name).encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def flip(path: Path, n: int = 8) -> None:
    """Invert ``n`` bytes in the middle of the file (bit rot in a chunk or in weights)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, min(mid + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, size: int) -> None:
    with path.open("r+b") as f:
        f.truncate(size)


def edit_manifest(store: Path, edit: Callable[[dict], None]) -> None:
    """Apply ``edit`` to ``attributes.kdm`` of the store's root zarr.json (the pair-store manifest)."""
    meta_path = store / "zarr.json"
    meta = json.loads(meta_path.read_text())
    edit(meta["attributes"]["kdm"])
    meta_path.write_text(json.dumps(meta, indent=2))


def manifest(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())["attributes"].get("kdm", {})


def shard_markers(out: Path) -> list[str]:
    d = Path(str(out) + ".partial") / PROGRESS_DIR
    return sorted(p.name for p in d.glob("*.done")) if d.is_dir() else []


def jpeg(seed: int) -> bytes:
    from PIL import Image
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# --------------------------------------------------------------------------------------- the battery


class Battery:
    """The scratch directory, the ``kdm`` runner, the fixtures and the mounts."""

    def __init__(self, workdir: Path, repo: Path, python: str):
        self.w, self.repo, self.python = workdir, repo, python
        self.meta = workdir / ".battery"
        (self.meta / "logs").mkdir(parents=True, exist_ok=True)
        (self.meta / "pristine").mkdir(exist_ok=True)
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(repo)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
        self.built: dict[str, dict] = {}       # fixture name -> how it was built
        self.hashes: dict[str, str] = {}        # fixture name -> tree hash when built
        self.mounts: list[Path] = []
        self.live: set[subprocess.Popen] = set()   # running kdm processes, stopped if the battery is
        self.n_logs = 0
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        # fixtures of an earlier run in the same --workdir are reused only for this script and commit
        self.fingerprint = hashlib.sha256(Path(__file__).read_bytes() + f"{repo} {head}".encode()).hexdigest()

    # -- processes

    def start(self, args, role: str = "case") -> tuple[subprocess.Popen, dict]:
        self.n_logs += 1
        out = (self.meta / "logs" / f"{self.n_logs:04d}.out").open("w+")
        err = (self.meta / "logs" / f"{self.n_logs:04d}.err").open("w+")
        args = [str(a) for a in args]
        proc = subprocess.Popen([self.python, "-m", "pipeline.cli", *args], cwd=self.w, env=self.env,
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL, process_group=0)
        self.live.add(proc)
        return proc, {"args": args, "t0": time.perf_counter(), "out": out, "err": err, "role": role}

    def finish(self, proc: subprocess.Popen, h: dict, timeout: float = 600) -> Run:
        try:
            rc = proc.wait(timeout=max(0.1, timeout - (time.perf_counter() - h["t0"])))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        self.live.discard(proc)
        seconds = h.get("t1", time.perf_counter()) - h["t0"]
        texts = []
        for f in (h["out"], h["err"]):
            f.seek(0)
            texts.append(f.read())
            f.close()
        return Run(h["args"], rc, texts[0], texts[1], seconds, h["role"])

    def finish_all(self, started: list[tuple[subprocess.Popen, dict]], timeout: float = 600) -> list[Run]:
        """Wait for processes that run at the same time, each timed to its own exit."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline and any(p.poll() is None for p, _ in started):
            for p, h in started:
                if p.poll() is not None and "t1" not in h:
                    h["t1"] = time.perf_counter()
            time.sleep(0.01)
        for p, h in started:
            if p.poll() is not None and "t1" not in h:
                h["t1"] = time.perf_counter()
        return [self.finish(p, h, timeout=0) for p, h in started]

    def kdm(self, *args, timeout: float = 600, role: str = "case") -> Run:
        proc, h = self.start(args, role)
        return self.finish(proc, h, timeout)

    def kill_when(self, proc: subprocess.Popen, h: dict, ready: Callable[[], bool], timeout: float = 300) -> Run:
        """SIGKILL ``proc`` as soon as ``ready()``; NotRun if it exits first or ``timeout`` passes."""
        deadline = time.time() + timeout
        while not ready():
            if proc.poll() is not None:
                run = self.finish(proc, h)
                raise NotRun(f"`{run.command}` exited ({run.rc}) before the kill point: {run.message}")
            if time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                self.finish(proc, h)
                raise NotRun(f"the kill point was not reached within {timeout:.0f} s")
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        run = self.finish(proc, h)
        run.role = "setup"
        return run

    # -- fixtures

    def need(self, name: str) -> str:
        """Build fixture ``name`` (and what it needs) unless it is already there; returns its name."""
        if name in self.built:
            return name
        builder, deps = FIXTURES[name]
        for d in deps:
            self.need(d)
        path = self.w / name
        t0 = time.perf_counter()
        if not self.complete(name):
            remove(path)
            remove(Path(str(path) + ".partial"))
            print(f"  building fixture {name} ...", file=sys.stderr, flush=True)
            builder(self, name)
        self.built[name] = {"seconds": round(time.perf_counter() - t0, 2)}
        self.hashes[name] = tree_hash(path)
        pristine = self.meta / "pristine" / name
        remove(pristine)
        if path.is_dir():
            shutil.copytree(path, pristine, symlinks=True)
        elif path.exists():
            shutil.copy2(path, pristine)
        return name

    def complete(self, name: str) -> bool:
        """A fixture left by an earlier run in the same --workdir (with its own completion mark)."""
        mark = self.meta / f"fixture-{name}.done"
        return mark.exists() and mark.read_text() == self.fingerprint and (self.w / name).exists()

    def build(self, name: str, *args, timeout: float = 600) -> None:
        """Run a fixture's ``kdm`` command; NotRun unless it succeeds."""
        run = self.kdm(*args, timeout=timeout, role="setup")
        if run.rc != 0 or run.traceback:
            raise NotRun(f"fixture {name} failed: `{run.command}` exit {run.rc}: {run.message}")
        self.built_ok(name)

    def built_ok(self, name: str) -> None:
        (self.meta / f"fixture-{name}.done").write_text(self.fingerprint)

    def check_fixtures(self) -> list[str]:
        """Fixtures whose content changed since they were built; they are restored."""
        changed = []
        for name, h in self.hashes.items():
            path = self.w / name
            if tree_hash(path) != h:
                changed.append(name)
                remove(path)
                pristine = self.meta / "pristine" / name
                if pristine.is_dir():
                    shutil.copytree(pristine, path, symlinks=True)
                elif pristine.exists():
                    shutil.copy2(pristine, path)
        return changed

    def copy_store(self, src: str, dst: str) -> Path:
        """A fresh copy of fixture ``src`` at ``dst`` (``cp -r src dst``)."""
        self.need(src)
        remove(self.w / dst)
        shutil.copytree(self.w / src, self.w / dst)
        return self.w / dst

    # -- mounts

    def mount(self, name: str, options: str) -> Path:
        """A tmpfs at ``name`` mounted with ``options``; NotRun when mounting is not permitted."""
        point = self.w / name
        if point.is_mount():
            self.umount(point)
        remove(point)
        point.mkdir()
        if shutil.which("mount") is None:
            raise NotRun("no `mount` command here")
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                             text=True)
        if res.returncode != 0:
            raise NotRun(f"`mount -t tmpfs -o {options}` is not permitted here: {res.stderr.strip()}")
        self.mounts.append(point)
        return point

    def umount(self, point: Path) -> None:
        subprocess.run(["umount", str(point)], capture_output=True)
        if point in self.mounts:
            self.mounts.remove(point)

    def umount_all(self) -> None:
        for point in list(self.mounts):
            self.umount(point)

    def stop_all(self) -> None:
        """SIGKILL the kdm processes still running (the battery was interrupted), then unmount."""
        for proc in list(self.live):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.umount_all()


# ----------------------------------------------------------------------------------------- fixtures

FIXTURES: dict[str, tuple[Callable[[Battery, str], None], tuple[str, ...]]] = {}


def fixture(name: str, *deps: str):
    def register(fn):
        FIXTURES[name] = (fn, deps)
        return fn
    return register


@fixture("teacher")
def _teacher(b, name):
    b.build(name, "teacher", "train", "--preset", "smoke", "--out", name, "-q")


@fixture("pairs", "teacher")
def _pairs(b, name):
    b.build(name, "pairs", "generate", "--teacher", "teacher", "--seeds", "0-1999", "--heldout-seeds", "2000-2399",
            "--steps", "4", "--method", "euler", "--chunk-size", "500", "--out", name, "-q")


@fixture("s_full", "pairs")
def _s_full(b, name):
    b.build(name, "train", "--pairs", "pairs", "--preset", "smoke", "--set", "train.steps=1000", "--set",
            "train.checkpoint_every=250", "--set", "train.threads=1", "--out", name, "-q")


@fixture("s_ref", "pairs")
def _s_ref(b, name):
    """The uninterrupted run the kill-and-resume cases of training are compared with."""
    b.build(name, "train", "--pairs", "pairs", *KILL_TRAIN, "--out", name, "-q")


@fixture("p_ref", "teacher")
def _p_ref(b, name):
    """The uninterrupted generation the kill / concurrency cases are compared with."""
    b.build(name, "pairs", "generate", "--teacher", "teacher", *KILL_GEN, "--out", name, "-q")


@fixture("p_ref8", "teacher")
def _p_ref8(b, name):
    args = list(KILL_GEN)
    args[args.index("--steps") + 1] = "8"
    b.build(name, "pairs", "generate", "--teacher", "teacher", *args, "--out", name, "-q")


@fixture("s_unf", "pairs")
def _s_unf(b, name):
    """An unfinished student run: `kdm train` SIGKILLed after its first checkpoint."""
    proc, h = b.start(["train", "--pairs", "pairs", *KILL_TRAIN, "--out", name, "-q"], role="setup")
    b.kill_when(proc, h, lambda: (b.w / name / "checkpoints" / "step-00000250" / "state.json").exists())
    b.built_ok(name)


@fixture("plainfile")
def _plainfile(b, name):
    (b.w / name).write_text("just a text file\n")
    b.built_ok(name)


NPY_INPUTS = ("good.npy", "n2.npy", "d4.npy", "t1.npy", "i64.npy", "nan.npy", "empty.npy", "one.npy", "obj.npy",
              "trunc.npy", "zero100.npy", "traj3.npy")


def _npy(b, name):
    rng = np.random.default_rng(0)
    good = rng.standard_normal((2, 200, 2)).astype(np.float32)
    path = b.w / name
    if name == "good.npy":
        np.save(path, good)
    elif name == "n2.npy":
        np.save(path, good[0])                                       # (200, 2)
    elif name == "d4.npy":
        np.save(path, rng.standard_normal((5, 200, 2, 1)).astype(np.float32))
    elif name == "t1.npy":
        np.save(path, good[:1])                                      # T = 1
    elif name == "i64.npy":
        np.save(path, rng.integers(-5, 6, (2, 200, 2)).astype(np.int64))
    elif name == "nan.npy":
        bad = good.copy()
        bad[0, 3, 0] = np.nan
        bad[-1, 7, 1] = np.inf
        np.save(path, bad)
    elif name == "empty.npy":
        np.save(path, np.zeros((10, 0, 2), np.float32))
    elif name == "one.npy":
        np.save(path, good[:, :1])                                   # one pair
    elif name == "obj.npy":
        np.save(path, np.array([[1, "a"], [None, 2.5]], dtype=object), allow_pickle=True)
    elif name == "trunc.npy":
        buf = io.BytesIO()
        np.save(buf, rng.standard_normal((2, 500, 2)).astype(np.float32))
        path.write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    elif name == "zero100.npy":
        path.write_bytes(bytes(100))
    elif name == "traj3.npy":
        np.save(path, rng.standard_normal((2, 1000, 3)).astype(np.float32))
    b.built_ok(name)


for _name in NPY_INPUTS:
    fixture(_name)(_npy)


@fixture("p11", "nan.npy")
def _p11(b, name):
    b.build(name, "pairs", "import", "nan.npy", "--format", "kdm-trajectories", "--holdout", "0.2", "--out", name, "-q")


@fixture("p13", "one.npy")
def _p13(b, name):
    b.build(name, "pairs", "import", "one.npy", "--format", "kdm-trajectories", "--holdout", "0.5", "--out", name,
            "-q")


@fixture("p3d", "traj3.npy")
def _p3d(b, name):
    b.build(name, "pairs", "import", "traj3.npy", "--format", "kdm-trajectories", "--holdout", "0.2", "--out", name,
            "-q")


@fixture("s3d", "p3d")
def _s3d(b, name):
    b.build(name, "train", "--pairs", "p3d", "--preset", "smoke", "--set", "model.dim=3", "--set", "train.steps=50",
            "--out", name, "-q")


@fixture("t_tamp", "teacher")
def _t_tamp(b, name):
    """A copy of the teacher with bytes of its weights flipped (the manifest still names the old sha256)."""
    shutil.copytree(b.w / "teacher", b.w / name)
    flip(b.w / name / "weights.safetensors")
    b.built_ok(name)


@fixture("junk.pkl")
def _junk_pkl(b, name):
    (b.w / name).write_bytes(pickle.dumps({"a": 1}))
    b.built_ok(name)


CONFIGS = {"c_unknown.yaml": None, "c_broken.yaml": "train:\n\tsteps: 5\n",       # a tab indent
           "c_list.yaml": "- 1\n- 2\n", "c_ok.yaml": None}


def _configs(b, name):
    smoke = (b.repo / "configs" / "student" / "smoke.yaml").read_text()
    text = {"c_unknown.yaml": smoke + "bogus: 1\n", "c_ok.yaml": smoke}.get(name) or CONFIGS[name]
    (b.w / name).write_text(text)
    b.built_ok(name)


for _name in CONFIGS:
    fixture(_name)(_configs)


@fixture("img")
def _img(b, name):
    """Tiny ImageFolder archives (2 classes x 4 JPEGs per split): good, non-tar, corrupt JPEG, truncated.
    The good one must prepare cleanly, so that only the damage makes the others fail."""
    d = b.w / name
    d.mkdir()
    members = {f"{split}/{cls}/{i:04d}.jpg": jpeg(100 * s + 10 * c + i)
               for s, split in enumerate(("train", "test")) for c, cls in enumerate(("cat", "dog")) for i in range(4)}
    write_tar(d / "good.tar.gz", members)
    write_tar(d / "corrupt.tar.gz", {**members, "train/dog/0002.jpg": b"this is not a JPEG image" * 8})
    (d / "nontar.tar.gz").write_bytes(b"this is not a tar archive\n" * 40)
    good = (d / "good.tar.gz").read_bytes()
    (d / "trunc.tar.gz").write_bytes(good[:len(good) // 2])
    run = b.kdm("dataset", "prepare", f"{name}/good.tar.gz", "--out", f"{name}/ds_good", "-q", role="setup")
    if run.rc != 0:
        raise NotRun(f"fixture img: the undamaged archive does not prepare: exit {run.rc}: {run.message}")
    b.built_ok(name)


# -------------------------------------------------------------------------------------------- cases


class Case:
    """One case while it runs: its runs with their verdicts, extra marks and notes."""

    def __init__(self, b: Battery, number: int, what: str):
        self.b, self.number, self.what = b, number, what
        self.runs: list[Run] = []
        self.marks: list[tuple[str, str]] = []
        self.notes: list[str] = []

    @property
    def w(self) -> Path:
        return self.b.w

    def need(self, *names: str) -> None:
        for n in names:
            self.b.need(n)

    def add(self, run: Run, verdict: Optional[str] = None, why: str = "") -> Run:
        run.verdict, run.why = verdict, why
        self.runs.append(run)
        return run

    def fail(self, *args, keys=(), max_lines: int = 2, forbid=(), usage: bool = False, timeout: float = 600) -> Run:
        """Run ``kdm args``, which should fail clearly."""
        run = self.b.kdm(*args, timeout=timeout)
        return self.add(run, *error_verdict(run, keys, max_lines, forbid, usage))

    def ok(self, *args, check: Optional[Callable[[Run], Optional[str]]] = None, bad: str = "partly clear",
           timeout: float = 600) -> Run:
        """Run ``kdm args``, which should succeed and pass ``check`` (returns a problem or None)."""
        run = self.b.kdm(*args, timeout=timeout)
        problem = check(run) if check and run.rc == 0 else None
        return self.add(run, *success_verdict(run, problem, bad))

    def judge_fail(self, run: Run, keys=(), max_lines: int = 2, forbid=()) -> Run:
        return self.add(run, *error_verdict(run, keys, max_lines, forbid))

    def judge_ok(self, run: Run, problem: Optional[str] = None, bad: str = "partly clear") -> Run:
        return self.add(run, *success_verdict(run, problem, bad))

    def mark(self, verdict: str, why: str) -> None:
        self.marks.append((verdict, why))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def absent(self, *names: str, verdict: str = "partly clear") -> None:
        """Mark outputs that a refused command left behind (``verdict``, default partly clear: a refusal
        leaves nothing a later command could take for a result)."""
        left = [n for n in names if (self.w / n).exists()]
        if left:
            self.mark(verdict, f"left {', '.join(left)}")

    @contextlib.contextmanager
    def unchanged(self, *names: str):
        """The targets ``names`` must be byte-for-byte the same after the block: else corrupted."""
        before = {n: tree_hash(self.w / n) for n in names}
        yield
        changed = [n for n in names if tree_hash(self.w / n) != before[n]]
        if changed:
            self.mark("corrupted", f"{', '.join(changed)} changed")

    def damaged(self, name: str, recipe: Callable[[Path], None]) -> Path:
        """``cp -r pairs NAME`` and apply ``recipe`` to the copy."""
        store = self.b.copy_store("pairs", name)
        recipe(store)
        return store

    def verdict(self) -> tuple[str, str]:
        judged = [(r.verdict, f"`{r.command}`: {r.why}") for r in self.runs if r.verdict] + self.marks
        if not judged:
            return "not run", "no judged run"
        worst = max(judged, key=lambda v: SEVERITY.index(v[0]))
        reasons = [why for v, why in judged if v == worst[0]] if worst[0] != "clear" else []
        return worst[0], "; ".join(reasons)


CASES: dict[int, tuple[str, Callable[[Case], None]]] = {}


def case(number: int, what: str):
    def register(fn):
        CASES[number] = (what, fn)
        return fn
    return register


def same_store(c: Case, out: str, ref: str) -> Optional[str]:
    """None when the store ``out`` has the version and content hash of fixture ``ref`` and passes
    `kdm pairs info --verify`; else what differs."""
    try:
        got, want = manifest(c.w / out), manifest(c.w / ref)
    except (OSError, KeyError, ValueError) as e:
        return f"{out} is not a readable store ({e})"
    if (got.get("version"), got.get("content_hash")) != (want.get("version"), want.get("content_hash")):
        return (f"{out} holds {got.get('version')} / content hash {str(got.get('content_hash'))[:12]}, "
                f"the reference {want.get('version')} / {str(want.get('content_hash'))[:12]}")
    v = c.b.kdm("pairs", "info", out, "--verify", role="setup")
    return f"`{v.command}` exit {v.rc}: {v.message}" if v.rc != 0 else None


TRAIN20 = ("--preset", "smoke", "--set", "train.steps=20")
GEN100 = ("--seeds", "0-99", "--steps", "4", "--method", "euler")
IMPORT = ("--format", "kdm-trajectories", "--holdout", "0.2")


# --- paths and import sources

@case(1, "`pairs info` on a missing path")
def case_1(c):
    c.fail("pairs", "info", "nope", keys=["nope", "no pair store"])


@case(2, "`pairs info` on a plain file")
def case_2(c):
    c.need("plainfile")
    c.fail("pairs", "info", "plainfile", keys=["plainfile", "no pair store"])


@case(3, "`train --pairs` a plain file")
def case_3(c):
    c.need("plainfile")
    c.fail("train", "--pairs", "plainfile", "--preset", "smoke", "--out", "s3", keys=["plainfile", "no pair store"])
    c.absent("s3")


@case(4, "`generate --teacher` missing")
def case_4(c):
    c.fail("pairs", "generate", "--teacher", "nope", "--seeds", "0-99", "--out", "p4", keys=["nope", "does not exist"])
    c.absent("p4", "p4.partial")


@case(5, "`import` missing source")
def case_5(c):
    c.fail("pairs", "import", "missing.npy", *IMPORT, "--out", "p5", keys=["missing.npy", "does not exist"])
    c.absent("p5")


@case(6, "`import` unknown `--format`")
def case_6(c):
    c.need("good.npy")
    c.fail("pairs", "import", "good.npy", "--format", "foo", "--holdout", "0.2", "--out", "p6",
           keys=["format", "foo", "kdm-trajectories"])


def bad_shape(c, src, shape):
    c.need(src)
    c.fail("pairs", "import", src, *IMPORT, "--out", f"p{c.number}", keys=[("T, N, D", "(T,N,D)"), shape])
    c.absent(f"p{c.number}")


@case(7, "`import` (N,2) array")
def case_7(c):
    bad_shape(c, "n2.npy", "(200, 2)")


@case(8, "`import` 4-D array")
def case_8(c):
    bad_shape(c, "d4.npy", "(5, 200, 2, 1)")


@case(9, "`import` T=1")
def case_9(c):
    bad_shape(c, "t1.npy", "(1, 200, 2)")


def store_rows(path: Path, array: str) -> np.ndarray:
    """Rows of ``array`` in the train and held-out splits of a pair store (read with zarr)."""
    import zarr
    g = zarr.open_group(str(path), mode="r")
    parts = [np.asarray(g[array][:])]
    if "heldout" in g:
        parts.append(np.asarray(g["heldout"][array][:]))
    return np.concatenate(parts)


def same_rows(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a[np.lexsort(a.T[::-1])], b[np.lexsort(b.T[::-1])])


@case(10, "`import` int64 .npy")
def case_10(c):
    c.need("i64.npy")
    src = np.load(c.w / "i64.npy")

    def check(run):
        x_t, x_0 = store_rows(c.w / "p10", "x_T"), store_rows(c.w / "p10", "x_0")
        if x_t.dtype != np.float32:
            return f"x_T stored as {x_t.dtype}"
        if not (same_rows(x_t, src[0].astype(np.float32)) and same_rows(x_0, src[-1].astype(np.float32))):
            return "stored values differ from the source cast to float32"
        help_ = c.b.kdm("pairs", "import", "--help", role="setup")
        if "float32" not in help_.out:
            return "`kdm pairs import --help` does not say the data is stored as float32"
        return None
    c.ok("pairs", "import", "i64.npy", *IMPORT, "--out", "p10", "-q", check=check)


@case(11, "`import` with NaN/Inf")
def case_11(c):
    c.need("nan.npy")
    remove(c.w / "p11")
    c.b.hashes.pop("p11", None)
    c.b.built.pop("p11", None)
    c.ok("pairs", "import", "nan.npy", *IMPORT, "--out", "p11", "-q",
         check=lambda r: None if has(r.err, ("nan", "non-finite")) and has(r.err, "filter") else
         "no warning that names the NaN/Inf pairs and `kdm pairs filter`")
    if c.runs[-1].rc == 0:
        c.b.built_ok("p11")


@case(12, "`import` empty (10,0,2)")
def case_12(c):
    c.need("empty.npy")
    c.fail("pairs", "import", "empty.npy", *IMPORT, "--out", "p12", "-q", keys=["empty.npy", "no pairs"])
    c.absent("p12", verdict="silently accepted")


@case(13, "`train` on an empty store (unreachable: #12 refuses; nearest: a 1-pair store)")
def case_13(c):
    c.need("one.npy")
    remove(c.w / "p13")
    c.b.hashes.pop("p13", None)
    c.b.built.pop("p13", None)
    c.ok("pairs", "import", "one.npy", "--format", "kdm-trajectories", "--holdout", "0.5", "--out", "p13", "-q")
    if c.runs[-1].rc == 0:
        c.b.built_ok("p13")
    c.ok("train", "--pairs", "p13", *TRAIN20, "--out", "s13", "-q",
         check=lambda r: None if (c.w / "s13" / "manifest.json").exists() else "no s13/manifest.json")
    c.note("case unreachable as written: #12 refuses to write an empty store; ran the 1-pair store instead")


@case(14, "`train` on the NaN store")
def case_14(c):
    c.need("p11")
    c.fail("train", "--pairs", "p11", *TRAIN20, "--out", "s14", "-q", keys=["p11", ("non-finite", "nan"), "filter"])
    c.absent("s14")


@case(15, "`import` object array")
def case_15(c):
    c.need("obj.npy")
    c.fail("pairs", "import", "obj.npy", *IMPORT, "--out", "p15", keys=["obj.npy", "is not a plain .npy array"])


@case(16, "`import` truncated .npy")
def case_16(c):
    c.need("trunc.npy")
    c.fail("pairs", "import", "trunc.npy", *IMPORT, "--out", "p16", keys=["trunc.npy", ("truncat", "eof")])


@case(17, "`import` 100 zero bytes")
def case_17(c):
    c.need("zero100.npy")
    c.fail("pairs", "import", "zero100.npy", *IMPORT, "--out", "p17", keys=["zero100.npy", "not a .npy"],
           forbid=["pickle"])


# --- damaged pair stores (copies of `pairs`)

def chunk_keys(array: str, chunk: int):
    return [array, (f"chunk {chunk}", f"{array}/c/{chunk}/0")]


@case(18, "flipped bytes in an x_0 chunk: `info --verify`")
def case_18(c):
    c.damaged("p_flip", lambda s: flip(s / "x_0" / "c" / "1" / "0"))
    c.fail("pairs", "info", "p_flip", "--verify", keys=["p_flip", *chunk_keys("x_0", 1)])


@case(19, "same corrupt store: `train`")
def case_19(c):
    c.damaged("p_flip", lambda s: flip(s / "x_0" / "c" / "1" / "0"))
    run = c.fail("train", "--pairs", "p_flip", *TRAIN20, "--out", "s19", "-q", keys=["p_flip", *chunk_keys("x_0", 1)])
    if run.rc == 0:
        c.mark("corrupted", "trained on a store with a corrupt chunk")
    c.absent("s19")


@case(20, "same corrupt store: `filter`")
def case_20(c):
    c.damaged("p_flip", lambda s: flip(s / "x_0" / "c" / "1" / "0"))
    run = c.fail("pairs", "filter", "--pairs", "p_flip", "--out", "f20", "-q", keys=["p_flip", *chunk_keys("x_0", 1)])
    if run.rc == 0:
        c.mark("corrupted", "filtered a store with a corrupt chunk into a new store")
    c.absent("f20", verdict="partly clear")


def deleted_chunk(s: Path):
    (s / "x_T" / "c" / "1" / "0").unlink()


@case(21, "deleted x_T chunk: `info --verify`")
def case_21(c):
    c.damaged("p_del", deleted_chunk)
    c.fail("pairs", "info", "p_del", "--verify", keys=["p_del", *chunk_keys("x_T", 1), "missing"])


@case(22, "deleted chunk: `train`")
def case_22(c):
    c.damaged("p_del", deleted_chunk)
    run = c.fail("train", "--pairs", "p_del", *TRAIN20, "--out", "s22", "-q", keys=["p_del", *chunk_keys("x_T", 1)])
    if run.rc == 0:
        c.mark("corrupted", "trained on the missing chunk")
    c.absent("s22")


@case(23, "deleted chunk: `filter`")
def case_23(c):
    c.damaged("p_del", deleted_chunk)
    run = c.fail("pairs", "filter", "--pairs", "p_del", "--out", "f23", "-q", keys=["p_del", *chunk_keys("x_T", 1)])
    if run.rc == 0:
        c.mark("corrupted", "the missing chunk was laundered into a new store")
    c.absent("f23", verdict="partly clear")


def manifest_case(c, edit, keys, train: bool = False, dry_run: bool = False, forbid=()):
    """An edited manifest (attributes.kdm of the root zarr.json): `info --verify` (and `train`) refuse it."""
    name = f"p{c.number}"
    c.damaged(name, lambda s: edit_manifest(s, edit))
    c.fail("pairs", "info", name, "--verify", keys=keys, forbid=forbid)
    if train:
        c.fail("train", "--pairs", name, *TRAIN20, *(["--dry-run"] if dry_run else []), "--out", f"s{c.number}", "-q",
               keys=keys, forbid=forbid)
        c.absent(f"s{c.number}")


@case(24, "manifest `count` edited")
def case_24(c):
    manifest_case(c, lambda m: m.update(count=1999), keys=["count", "1999", "!= (count, *sample_shape)"], train=True, forbid=['"arrays"'])


@case(25, "manifest `content_hash` edited")
def case_25(c):
    manifest_case(c, lambda m: m.update(content_hash="0" * 64), keys=["content hash", "mismatch"], train=True)


@case(26, "manifest `schema_version: 99`")
def case_26(c):
    manifest_case(c, lambda m: m.update(schema_version=99), keys=["schema_version", "99", "is newer than this kdm reads"], train=True, dry_run=True)


@case(27, "manifest: `kdm` attribute removed")
def case_27(c):
    name = "p27"

    def drop(s):
        meta = json.loads((s / "zarr.json").read_text())
        del meta["attributes"]["kdm"]
        (s / "zarr.json").write_text(json.dumps(meta, indent=2))
    c.damaged(name, drop)
    c.fail("pairs", "info", name, "--verify", keys=[name, "manifest"])


@case(28, "unknown manifest field")
def case_28(c):
    manifest_case(c, lambda m: m.update(bogus=1), keys=["bogus", "unknown field"])


@case(29, "manifest `version` forged (`pairs-0000000000000000`)")
def case_29(c):
    manifest_case(c, lambda m: m.update(version="pairs-0000000000000000"), keys=["version", "is not the hash of its recorded inputs"], train=True)


@case(30, "manifest `sample_shape` edited to [3]")
def case_30(c):
    manifest_case(c, lambda m: m.update(sample_shape=[3]), keys=["sample_shape", "!= (count, *sample_shape)"], train=True, forbid=['"arrays"'])


@case(31, "`x_0/zarr.json` deleted")
def case_31(c):
    c.damaged("p31", lambda s: (s / "x_0" / "zarr.json").unlink())
    keys = ["p31", "x_0", "missing"]
    c.fail("pairs", "info", "p31", "--verify", keys=keys)
    c.fail("train", "--pairs", "p31", *TRAIN20, "--out", "s31", "-q", keys=keys)
    c.absent("s31")


def evaluate_damaged(c, store: str, keys):
    """`info --verify` and `evaluate` on a store with a damaged held-out split: both refuse, no report."""
    c.fail("pairs", "info", store, "--verify", keys=keys)
    out = f"ev{c.number}/report.json"
    run = c.fail("evaluate", "--student", "s_full", "--pairs", store, "--out", out, keys=keys)
    if run.rc == 0 and (c.w / out).exists():
        c.mark("corrupted", f"evaluate wrote {out} from a damaged held-out split")
    elif (c.w / f"ev{c.number}").is_dir() and not (c.w / out).exists():
        c.mark("partly clear", f"an empty ev{c.number}/ is left")


@case(32, "`heldout/` group deleted")
def case_32(c):
    c.need("s_full")
    c.damaged("p32", lambda s: shutil.rmtree(s / "heldout"))
    evaluate_damaged(c, "p32", ["p32", ("held-out", "heldout"), "missing"])


@case(33, "held-out chunk flipped")
def case_33(c):
    c.need("s_full")
    c.damaged("p33", lambda s: flip(s / "heldout" / "x_0" / "c" / "0" / "0"))
    evaluate_damaged(c, "p33", ["p33", "heldout", *chunk_keys("x_0", 0)])


@case(34, "held-out chunk deleted")
def case_34(c):
    c.need("s_full")
    c.damaged("p34", lambda s: (s / "heldout" / "x_0" / "c" / "0" / "0").unlink())
    evaluate_damaged(c, "p34", ["p34", "heldout", *chunk_keys("x_0", 0), "missing"])


# --- seed ranges

def gen(c, *args, keys, out=None, timeout=600):
    c.need("teacher")
    out = out or f"p{c.number}"
    run = c.fail("pairs", "generate", "--teacher", "teacher", *args, "--out", out, keys=keys, timeout=timeout)
    c.absent(out, out + ".partial")
    return run


@case(35, "`--seeds 100-10`")
def case_35(c):
    gen(c, "--seeds", "100-10", keys=["100-10", "END must be >= START"])


@case(36, "negative seeds (`-5-10`, `=-5-10`)")
def case_36(c):
    gen(c, "--seeds", "-5-10", keys=["-5-10", "non-negative"])
    gen(c, "--seeds=-5-10", keys=["-5-10", "non-negative"])


@case(37, "train / held-out seed ranges overlap")
def case_37(c):
    gen(c, "--seeds", "0-99", "--heldout-seeds", "50-149", keys=["overlap", "50-149", "0-99"])


@case(38, "`--seeds 0-99999999999999` (dry run and real)")
def case_38(c):
    gen(c, "--seeds", "0-99999999999999", "--dry-run", keys=["shards", "use a smaller seed range"], timeout=120)
    gen(c, "--seeds", "0-99999999999999", keys=["shards", "use a smaller seed range"], timeout=120)


@case(39, "seeds beyond int64")
def case_39(c):
    gen(c, "--seeds", "0-99999999999999999999999", "--dry-run", keys=["9223372036854775807", "seeds must be at most"])
    gen(c, "--seeds", "9223372036854775800-9223372036854775810", keys=["9223372036854775807", "seeds must be at most"])


@case(40, "`--seeds abc` / `5`")
def case_40(c):
    gen(c, "--seeds", "abc", keys=["abc", "START-END"])
    gen(c, "--seeds", "5", keys=["'5'", "START-END"])


# --- presets, --set, --config

@case(41, "unknown student / teacher / distill preset")
def case_41(c):
    c.need("pairs")
    c.fail("train", "--pairs", "pairs", "--preset", "nosuch", "--out", "s41", keys=["nosuch", "smoke"])
    c.fail("teacher", "train", "--preset", "nosuch", "--out", "t41", keys=["nosuch", "smoke"])
    c.fail("distill", "--recipe", "checkerboard", "--preset", "nosuch", keys=["nosuch", "has no preset"])
    c.absent("s41", "t41", "artifacts")


@case(42, "misspelt `--set` key")
def case_42(c):
    c.need("pairs")
    c.fail("train", "--pairs", "pairs", "--preset", "smoke", "--set", "train.stpes=5", "--out", "s42",
           keys=["train.stpes", "unknown field"])


@case(43, "wrong `--set` values (7 runs)")
def case_43(c):
    c.need("pairs")
    for kv, why in (("train.steps=abc", "should be a valid integer"), ("train.steps=1.5", "should be a valid integer"),
                    ("train.steps=0", "greater than or equal to 1"), ("train.lr=-1", "should be greater than 0"),
                    ("train.lr=nan", "should be greater than 0"), ("train.batch_size=-4", "greater than or equal to 1"),
                    ("train.ema_decay=2", "should be less than 1")):
        c.fail("train", "--pairs", "pairs", "--preset", "smoke", "--set", kv, "--out", "s43",
               keys=[kv.split("=")[0], why])
    c.absent("s43")


@case(44, "`--set train.steps` with no `=`")
def case_44(c):
    c.need("pairs")
    c.fail("train", "--pairs", "pairs", "--preset", "smoke", "--set", "train.steps", "--out", "s44",
           keys=["train.steps", "key=value"])


@case(45, "`--set model.dim=3` on 2-D pairs (dry run and real)")
def case_45(c):
    c.need("pairs")
    for dry in (["--dry-run"], []):
        c.fail("train", "--pairs", "pairs", "--preset", "smoke", "--set", "model.dim=3", *dry, "--out", "s45", "-q",
               keys=["model.dim", "(2,)"])
    c.absent("s45")


@case(46, "`--config`: unknown field, broken YAML, a list, missing file, with `--preset`")
def case_46(c):
    c.need("pairs", "c_unknown.yaml", "c_broken.yaml", "c_list.yaml", "c_ok.yaml")
    base = ("train", "--pairs", "pairs", "--out", "s46")
    c.fail(*base, "--config", "c_unknown.yaml", keys=["bogus", "unknown field"])
    # PyYAML's position report (4 lines under the error) was accepted as clear by the battery
    c.fail(*base, "--config", "c_broken.yaml", keys=["c_broken.yaml", "is not valid YAML"], max_lines=5)
    c.fail(*base, "--config", "c_list.yaml", keys=["c_list.yaml", "must hold a mapping"])
    c.fail(*base, "--config", "c_missing.yaml", keys=["c_missing.yaml", "does not exist"])
    c.fail(*base, "--config", "c_ok.yaml", "--preset", "smoke", keys=["either --preset or --config, not both"])
    c.absent("s46")


# --- writers aimed at existing targets

REFUSE_FORBID = ("not a committed", "remove it")    # said of a committed artifact, both are wrong


@case(47, "`train --out` onto a teacher directory")
def case_47(c):
    c.need("pairs", "teacher")
    c.fail("train", "--pairs", "pairs", *TRAIN20, "--out", "teacher", "-q",
           keys=["teacher", ("kdm-teacher", "teacher artifact", "another kind")], forbid=["Input should be"])


@case(48, "`train --out` onto an existing pair store")
def case_48(c):
    c.need("pairs")
    c.b.copy_store("pairs", "p48")
    with c.unchanged("p48"):
        c.fail("train", "--pairs", "pairs", "--preset", "smoke", "--set", "train.steps=10", "--out", "p48", "-q",
               keys=["p48", "holds another kind of artifact"], forbid=REFUSE_FORBID)


@case(49, "`train --out` onto a non-empty unrelated directory")
def case_49(c):
    c.need("pairs")
    remove(c.w / "junkdir")
    (c.w / "junkdir").mkdir()
    (c.w / "junkdir" / "notes.txt").write_text("my notes\n")
    with c.unchanged("junkdir"):
        c.fail("train", "--pairs", "pairs", *TRAIN20, "--out", "junkdir", "-q", keys=["junkdir", "not empty"])


@case(50, "`train --out` a regular file")
def case_50(c):
    c.need("pairs", "plainfile")
    c.fail("train", "--pairs", "pairs", *TRAIN20, "--out", "plainfile", "-q", keys=["plainfile", "is a file, not a run directory"])


@case(51, "`generate` / `import --out` onto a teacher, another store, a file")
def case_51(c):
    c.need("teacher", "good.npy", "plainfile")
    c.b.copy_store("pairs", "p51")
    with c.unchanged("p51"):
        c.fail("pairs", "generate", "--teacher", "teacher", *GEN100, "--out", "teacher", "-q", keys=["teacher", "not the artifact this command writes"],
               forbid=REFUSE_FORBID)
        c.fail("pairs", "generate", "--teacher", "teacher", *GEN100, "--out", "p51", "-q", keys=["p51", "immutable"],
               forbid=REFUSE_FORBID)
        c.fail("pairs", "import", "good.npy", *IMPORT, "--out", "plainfile", "-q", keys=["plainfile", "not a directory"])
        c.fail("pairs", "import", "good.npy", *IMPORT, "--out", "p51", "-q", keys=["p51", "immutable"],
               forbid=REFUSE_FORBID)


@case(52, "`teacher train --out` onto a pair store / an unrelated non-empty directory")
def case_52(c):
    c.b.copy_store("pairs", "p48")
    remove(c.w / "junkdir")
    (c.w / "junkdir").mkdir()
    (c.w / "junkdir" / "notes.txt").write_text("my notes\n")
    with c.unchanged("p48", "junkdir"):
        c.fail("teacher", "train", "--preset", "smoke", "--out", "p48", "-q", keys=["p48", "not the artifact this command writes"], forbid=REFUSE_FORBID)
        c.fail("teacher", "train", "--preset", "smoke", "--out", "junkdir", "-q", keys=["junkdir", "is not a committed kdm artifact"])
    c.note("#48 refuses, so its polluted store does not arise: ran against an intact pair store and junkdir")


@case(53, "`train` with another config onto a finished student")
def case_53(c):
    c.need("s_full")
    c.fail("train", "--pairs", "pairs", "--preset", "smoke", "--set", "train.steps=30", "--out", "s_full", "-q",
           keys=["s_full", "immutable"])


# --- kill and resume, concurrent writers

def same_weights(c, run_dir: str, ref: str) -> Optional[str]:
    a, b = c.w / run_dir / "student.safetensors", c.w / ref / "student.safetensors"
    if not a.exists():
        return f"no {a.relative_to(c.w)}"
    return None if a.read_bytes() == b.read_bytes() else f"{run_dir}/student.safetensors differs from {ref}'s"


def killed_train(c, out: str, step: int) -> Run:
    """`kdm train` (3000 steps, checkpoints every 250) SIGKILLed once its step-``step`` checkpoint exists."""
    remove(c.w / out)
    proc, h = c.b.start(["train", "--pairs", "pairs", *KILL_TRAIN, "--out", out, "-q"])
    ckpt = c.w / out / "checkpoints" / f"step-{step:08d}" / "state.json"
    run = c.add(c.b.kill_when(proc, h, ckpt.exists))
    if (c.w / out / "manifest.json").exists():
        raise NotRun("the run finished before the kill")
    return run


@case(54, "SIGKILL `train` after the step-1250 checkpoint, rerun")
def case_54(c):
    c.need("pairs", "s_ref")
    killed_train(c, "s54", 1250)
    run = c.ok("train", "--pairs", "pairs", *KILL_TRAIN, "--out", "s54", "-q",
               check=lambda r: same_weights(c, "s54", "s_ref"), bad="corrupted")
    if run.rc == 0 and "resumed from" not in run.out:
        c.mark("partly clear", "the rerun did not say that it resumed")


@case(55, "kill `train`, truncate the newest checkpoint, rerun")
def case_55(c):
    c.need("pairs", "s_ref")
    killed_train(c, "s55", 2000)
    newest = sorted(p for p in (c.w / "s55" / "checkpoints").glob("step-*") if p.is_dir())[-1]
    truncate(newest / "model.safetensors", 5000)
    c.note(f"truncated {newest.relative_to(c.w)}/model.safetensors to 5000 bytes")
    c.ok("train", "--pairs", "pairs", *KILL_TRAIN, "--out", "s55", "-q",
         check=lambda r: same_weights(c, "s55", "s_ref"), bad="corrupted")
    if c.runs[-1].rc == 0 and not has(c.runs[-1].err, "damaged"):
        c.mark("partly clear", "no warning about the damaged checkpoint")


def concurrent(c, out: str, delay: float):
    """Two `pairs generate` onto one --out, the second ``delay`` s after the first: one writes the store,
    the other finishes as well or is refused clearly; the store equals the uninterrupted reference."""
    c.need("teacher", "p_ref")
    remove(c.w / out)
    remove(c.w / (out + ".partial"))
    args = ["pairs", "generate", "--teacher", "teacher", *KILL_GEN, "--out", out, "-q"]
    first = c.b.start(args)
    time.sleep(delay)
    second = c.b.start(args)
    for run in c.b.finish_all([first, second]):
        if run.rc == 0:
            c.judge_ok(run)
        else:
            c.judge_fail(run, keys=[out, ("another", "lock", "writing")])
    problem = same_store(c, out, "p_ref")
    if problem:
        c.mark("corrupted", problem)


@case(56, "two `pairs generate` at the same moment, same `--out`")
def case_56(c):
    concurrent(c, "p56", 0)


@case(57, "same, second one started 3 s later")
def case_57(c):
    concurrent(c, "p57", 3)


def killed_generate(c, out: str, steps: str = "4") -> None:
    """`pairs generate` (40 shards) SIGKILLed once shard 0 and at least 20 shards are finished."""
    remove(c.w / out)
    remove(c.w / (out + ".partial"))
    args = list(KILL_GEN)
    args[args.index("--steps") + 1] = steps
    proc, h = c.b.start(["pairs", "generate", "--teacher", "teacher", *args, "--out", out, "-q"])
    c.add(c.b.kill_when(proc, h, lambda: len(m := shard_markers(c.w / out)) >= 20 and "shard-000000.done" in m))
    if (c.w / out).exists():
        raise NotRun("the generation finished before the kill")
    c.note(f"killed with {len(shard_markers(c.w / out))} of 40 shards done")


@case(58, "kill `generate`, rerun with other `--steps`")
def case_58(c):
    c.need("teacher", "p_ref8")
    killed_generate(c, "p58")
    c.ok("pairs", "generate", "--teacher", "teacher", *[a if a != "4" else "8" for a in KILL_GEN], "--out", "p58", "-q",
         check=lambda r: same_store(c, "p58", "p_ref8"), bad="corrupted")
    with c.unchanged("p58"):
        c.fail("pairs", "generate", "--teacher", "teacher", *KILL_GEN, "--out", "p58", "-q",
               keys=["p58", "immutable"])


@case(59, "kill `generate`, rerun with the same `--steps`")
def case_59(c):
    c.need("teacher", "p_ref")
    killed_generate(c, "p59")
    c.ok("pairs", "generate", "--teacher", "teacher", *KILL_GEN, "--out", "p59", "-q",
         check=lambda r: same_store(c, "p59", "p_ref"), bad="corrupted")


@case(60, "kill `generate`, delete a chunk of a finished shard, rerun")
def case_60(c):
    c.need("teacher", "p_ref")
    killed_generate(c, "p60")
    (c.w / "p60.partial" / "x_0" / "c" / "0" / "0").unlink()
    c.ok("pairs", "generate", "--teacher", "teacher", *KILL_GEN, "--out", "p60", "-q",
         check=lambda r: same_store(c, "p60", "p_ref"), bad="corrupted")
    if c.runs[-1].rc == 0 and not has(c.runs[-1].err, "recomput"):
        c.mark("partly clear", "no warning about the recomputed shard")


# --- read-only and full disks

@case(61, "read-only output (`generate`, `train`, `teacher train`)")
def case_61(c):
    c.need("teacher", "pairs")
    ro = c.b.mount("ro", "ro")
    try:
        keys = [("read-only", "read only"), "ro/"]
        c.fail("pairs", "generate", "--teacher", "teacher", *GEN100, "--out", "ro/p", "-q", keys=keys)
        c.fail("train", "--pairs", "pairs", *TRAIN20, "--out", "ro/s", "-q", keys=keys)
        c.fail("teacher", "train", "--preset", "smoke", "--out", "ro/t", "-q", keys=keys)
    finally:
        c.b.umount(ro)


@case(62, "disk full (64 KiB tmpfs): `generate`, `train`")
def case_62(c):
    c.need("teacher", "pairs")
    fg, ft = c.b.mount("full_g", "size=64k"), c.b.mount("full_t", "size=64k")
    try:
        full = ("no space left", "disk is full")          # and where: the full disk's path
        c.fail("pairs", "generate", "--teacher", "teacher", *KILL_GEN, "--out", "full_g/p", "-q",
               keys=[full, "full_g/"])
        c.fail("train", "--pairs", "pairs", "--preset", "smoke", "--set", "train.steps=1000", "--set",
               "train.checkpoint_every=250", "--set", "train.threads=1", "--out", "full_t/s", "-q",
               keys=[full, "full_t/"])
        # nothing later treats the leftovers as valid
        c.fail("pairs", "info", "full_g/p", keys=["full_g/p", "no pair store"])
        c.fail("sample", "--student", "full_t/s", "--num", "10", "--out", "smp62.npy", keys=["full_t/s", ("is an unfinished student run", "is not a student run")])
        # what a full disk may leave: the resumable state (the generation's .partial, the run directory with
        # its partial checkpoints), which the two refusals above show no reader takes for a result
        left = sorted(str(p.relative_to(c.w)) for d in (fg, ft) for p in d.iterdir())
        unexpected = [p for p in left if p not in ("full_g/p.partial", "full_t/s")]
        if unexpected:
            c.mark("partly clear", f"left {', '.join(unexpected)} beside the resumable state")
        else:
            c.note("left only the resumable state: " + (", ".join(left) or "nothing"))
    finally:
        c.b.umount(fg)
        c.b.umount(ft)


# --- image archives, teacher registration

@case(63, "`dataset prepare`: non-tar, corrupt JPEG")
def case_63(c):
    c.need("img")
    c.fail("dataset", "prepare", "img/nontar.tar.gz", "--out", "ds_a", "-q", keys=["nontar.tar.gz", "is not a (gzip-compressed) tar archive"])
    c.fail("dataset", "prepare", "img/corrupt.tar.gz", "--out", "ds_b", "-q", keys=["train/dog/0002.jpg", "cannot decode image"])
    c.absent("ds_a", "ds_a.partial", "ds_b", "ds_b.partial")


@case(64, "`dataset prepare`: truncated tar")
def case_64(c):
    c.need("img")
    c.fail("dataset", "prepare", "img/trunc.tar.gz", "--out", "ds_c", "-q",
           keys=["trunc.tar.gz", ("truncated", "corrupt")])
    c.absent("ds_c", "ds_c.partial")


@case(65, "`dataset prepare`: missing file, `--chunk-size 0`")
def case_65(c):
    c.need("img")
    c.fail("dataset", "prepare", "img/missing.tar.gz", "--out", "ds_d", "-q", keys=["missing.tar.gz", "does not exist"])
    c.fail("dataset", "prepare", "img/good.tar.gz", "--chunk-size", "0", "--out", "ds_e", "-q",
           keys=[("chunk_size", "chunk-size"), "must be >= 1"])
    c.absent("ds_d", "ds_e", "ds_e.partial")


@case(66, "`teacher register`: wrong sha256, bad hex, tampered weights, pkl without sha, junk pkl, missing path")
def case_66(c):
    c.need("teacher", "t_tamp", "junk.pkl")
    remove(c.w / "reg")
    reg = ("--root", "reg", "--no-event")
    junk_sha = hashlib.sha256((c.w / "junk.pkl").read_bytes()).hexdigest()
    c.fail("teacher", "register", "teacher", "--sha256", "0" * 64, *reg, keys=["sha256", "mismatch"])
    c.fail("teacher", "register", "teacher", "--sha256", "xyz", *reg, keys=["xyz", "is not a sha256 digest"])
    c.fail("teacher", "register", "t_tamp", *reg, keys=["t_tamp", ("does not match", "mismatch")])
    c.fail("teacher", "register", "junk.pkl", "--kind", "edm-pkl", *reg, keys=["sha256"])
    c.fail("teacher", "register", "junk.pkl", "--kind", "edm-pkl", "--sha256", junk_sha, *reg, keys=["ema"])
    c.fail("teacher", "register", "nope_teacher", *reg, keys=["nope_teacher", "does not exist"])
    records = list((c.w / "reg").rglob("*.json")) if (c.w / "reg").exists() else []
    if records:
        c.mark("silently accepted", f"a registry record was written: {records[0].relative_to(c.w)}")


@case(67, "`generate` with a tampered teacher")
def case_67(c):
    c.need("t_tamp")
    c.fail("pairs", "generate", "--teacher", "t_tamp", *GEN100, "--out", "p67", "-q",
           keys=["t_tamp", ("does not match", "mismatch")])
    c.absent("p67", "p67.partial")


# --- evaluate, device, sample, option ranges, distill / report

def no_report(c, out: str):
    if (c.w / out).exists():
        c.mark("corrupted", f"a report was written to {out}")
    elif (c.w / out).parent.is_dir():
        c.mark("partly clear", f"an empty {Path(out).parent}/ is left")


@case(68, "`evaluate` a 3-D student on 2-D pairs, and the reverse")
def case_68(c):
    c.need("s_full", "s3d", "p3d")
    dim = ("3-D", "2-D", "dimension", "shape")
    c.fail("evaluate", "--student", "s3d", "--pairs", "pairs", "--out", "ev68a/report.json", keys=["s3d", dim])
    no_report(c, "ev68a/report.json")
    c.fail("evaluate", "--student", "s_full", "--pairs", "p3d", "--out", "ev68b/report.json", keys=["p3d", dim])
    no_report(c, "ev68b/report.json")


@case(69, "`evaluate` on a store with no held-out split")
def case_69(c):
    c.need("s_full", "p13")
    c.fail("evaluate", "--student", "s_full", "--pairs", "p13", "--out", "ev69/report.json",
           keys=["p13", ("held-out", "heldout")])
    no_report(c, "ev69/report.json")


@case(70, "`--device cuda` with no GPU, then a CPU rerun")
def case_70(c):
    c.need("pairs")
    probe = subprocess.run([c.b.python, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True,
                           text=True, env=c.b.env)
    if probe.stdout.strip() != "False":
        raise NotRun(f"a CUDA GPU is visible here (torch.cuda.is_available: {probe.stdout.strip() or probe.stderr})")
    remove(c.w / "s70")
    c.fail("train", "--pairs", "pairs", *TRAIN20, "--device", "cuda", "--out", "s70", "-q", keys=["cuda", "no CUDA GPU is visible"])
    c.ok("train", "--pairs", "pairs", *TRAIN20, "--out", "s70", "-q",
         check=lambda r: None if (c.w / "s70" / "manifest.json").exists() else "no s70/manifest.json")


@case(71, "`sample --num -5` / `--num 0`")
def case_71(c):
    c.need("s_full")
    for n in ("-5", "0"):
        c.fail("sample", "--student", "s_full", "--num", n, "--out", "smp71.npy", keys=["--num", n, "must be at least 1"])
    c.absent("smp71.npy", verdict="silently accepted")


@case(72, "`sample --out` a directory")
def case_72(c):
    c.need("s_full")
    remove(c.w / "sdir")
    (c.w / "sdir").mkdir()
    c.fail("sample", "--student", "s_full", "--num", "10", "--seed", "0", "--out", "sdir", keys=["sdir", "directory"])
    left = list((c.w / "sdir").iterdir()) + [p for p in (c.w / "sdir.npy",) if p.exists()]
    if left:
        c.mark("silently accepted", f"wrote {left[0].relative_to(c.w)}")


@case(73, "`sample --student` an unfinished run / a pair store / a teacher")
def case_73(c):
    c.need("s_unf", "pairs", "teacher")
    c.fail("sample", "--student", "s_unf", "--num", "10", "--out", "smp73.npy", keys=["s_unf", "unfinished"])
    c.fail("sample", "--student", "pairs", "--num", "10", "--out", "smp73.npy", keys=["pairs", ("zarr", "pair store")])
    c.fail("sample", "--student", "teacher", "--num", "10", "--out", "smp73.npy",
           keys=["teacher", ("teacher artifact", "kdm-teacher", "not a student")])
    c.absent("smp73.npy", verdict="silently accepted")


@case(74, "`--holdout` 1.5 / 1.0 / -0.1")
def case_74(c):
    c.need("good.npy")
    for h in ("1.5", "1.0", "-0.1"):
        c.fail("pairs", "import", "good.npy", "--format", "kdm-trajectories", f"--holdout={h}", "--out", "p74", "-q",
               keys=[("holdout", "--holdout"), ("should be less than 1", "greater than or equal to 0")])
    c.absent("p74")


@case(75, "`--method rk4`, `--steps 0`, `--chunk-size 0`")
def case_75(c):
    c.need("teacher")
    base = ("pairs", "generate", "--teacher", "teacher", "--seeds", "0-99")
    c.fail(*base, "--method", "rk4", "--out", "p75", "-q", keys=["method", "rk4", "should be 'euler', 'midpoint' or 'heun'"])
    c.fail(*base, "--steps", "0", "--out", "p75", "-q", keys=["steps", "greater than or equal to 1"])
    c.fail(*base, "--chunk-size", "0", "--out", "p75", "-q", keys=[("chunk_size", "chunk-size"), "greater than or equal to 1"])
    c.absent("p75", "p75.partial")


@case(76, "bad distill preset / recipe; `report` on a missing root / report; unknown command")
def case_76(c):
    c.fail("distill", "--recipe", "checkerboard", "--preset", "bogus", keys=["bogus", "has no preset"])
    c.fail("distill", "--recipe", "cifar10", "--preset", "bogus", keys=["bogus", "has no preset"])
    c.fail("distill", "--recipe", "bogus", "--preset", "smoke", keys=["bogus", "invalid choice", "checkerboard"], usage=True)
    c.fail("report", "--root", "missing_root", keys=["missing_root", "no evaluation reports under"])
    c.fail("report", "--report", "missing/report.json", keys=["missing/report.json", "does not exist"])
    c.fail("frobnicate", keys=["frobnicate", "invalid choice"], usage=True)
    c.absent("artifacts")


# --------------------------------------------------------------------------------------------- main


@dataclass
class Row:
    number: int
    what: str
    verdict: str
    why: str = ""
    notes: list[str] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    seconds: float = 0.0

    def cells(self) -> list[str]:
        shown = self.runs
        cmds = "; ".join(r.command + (" (killed)" if r.role == "setup" else "") for r in shown)
        msgs = []
        for r in shown:
            if r.role != "setup" and r.message and r.message not in msgs:
                msgs.append(r.message)
        verdict = self.verdict + (f": {self.why}" if self.why else "")
        if self.notes:
            verdict += f" ({'; '.join(self.notes)})"
        cell = lambda s, n: shorten(s, n).replace("|", "\\|")
        return [str(self.number), cell(self.what, 120), cell(f"`{cmds}`" if cmds else "", 400),
                " / ".join("kill" if r.role == "setup" else str(r.rc) for r in shown) or "-",
                "yes" if any(r.traceback for r in shown) else "no",
                cell(" // ".join(shorten(m, 160) for m in msgs), 400),
                " / ".join(f"{r.seconds:.2f}" for r in shown) or "-", cell(verdict, 400)]


def run_case(b: Battery, number: int) -> Row:
    what, fn = CASES[number]
    c = Case(b, number, what)
    t0 = time.perf_counter()
    outputs = b.meta / f"outputs-{number}.json"
    if outputs.exists():                      # outputs of this case from an earlier run in this workdir
        for name in json.loads(outputs.read_text()):
            if name not in b.hashes and not (b.w / name).is_mount():
                remove(b.w / name)
    before = {p.name for p in b.w.iterdir()}
    try:
        fn(c)
        verdict, why = c.verdict()
    except NotRun as e:
        verdict, why = "not run", str(e)
    except Exception as e:                       # a fault of the battery itself, not of kdm
        import traceback
        traceback.print_exc()
        verdict, why = "not run", f"battery error: {type(e).__name__}: {e}"
    finally:
        b.umount_all()
    changed = b.check_fixtures()
    if changed:
        verdict, why = "corrupted", f"fixture(s) {', '.join(changed)} changed (restored); " + why
    created = sorted({p.name for p in b.w.iterdir()} - before - set(b.hashes))
    outputs.write_text(json.dumps(created))
    return Row(number, what, verdict, why, c.notes, c.runs, time.perf_counter() - t0)


# Cases that need no trained teacher, pair store or student (seconds each): run by make test
# (tests/test_bad_input_battery.py) with ``--cases fast``.
FAST_CASES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15, 16, 17, 63, 64, 65, 74, 76)


def parse_cases(text: Optional[str]) -> list[int]:
    if not text:
        return sorted(CASES)
    if text.strip() == "fast":
        return list(FAST_CASES)
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    unknown = sorted(set(out) - set(CASES))
    if unknown:
        raise SystemExit(f"no such case(s): {unknown}; cases are 1-{max(CASES)}")
    return sorted(set(out))


def help_timing(b: Battery, n: int = 5) -> list[float]:
    return [round(b.kdm("--help", role="setup").seconds, 3) for _ in range(n)]


def markdown(rows: list[Row]) -> str:
    head = ["#", "what", "command", "exit", "tb", "message", "seconds", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def counts(rows: list[Row]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {v: [] for v in (*SEVERITY, "not run")}
    for r in rows:
        out[r.verdict].append(r.number)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__[__doc__.index("Examples:"):],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", help="numbers and ranges, e.g. 1,29,51-53, or 'fast' (the cases that need no "
                                   "trained fixture; default: all 76)")
    p.add_argument("--workdir", help="scratch directory (default: a fresh temp dir); fixtures built there by "
                                     "an earlier run of this script on the same commit are reused; never deleted")
    p.add_argument("--keep", action="store_true", help="keep the temp scratch directory")
    p.add_argument("--repo", default=str(REPO), help="the checkout under test (default: the one holding this script)")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs `-m pipeline.cli`")
    p.add_argument("--json", help="write the rows, fixture timings and counts to this file")
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # unmount and stop children on a kill too

    numbers = parse_cases(a.cases)
    own_dir = a.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="kdm-battery-") if own_dir else a.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    b = Battery(workdir, Path(a.repo).resolve(), a.python)
    print(f"battery: {len(numbers)} case(s) in {workdir} against {b.repo}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    rows: list[Row] = []
    try:
        helps = help_timing(b)
        for i, n in enumerate(numbers, 1):
            row = run_case(b, n)
            rows.append(row)
            print(f"[{i}/{len(numbers)}] #{n} {shorten(row.what, 60)}: {row.verdict} ({row.seconds:.1f} s)"
                  + (f" - {shorten(row.why, 160)}" if row.verdict != "clear" else ""), file=sys.stderr, flush=True)
    finally:
        b.stop_all()
    total = time.perf_counter() - t0

    print(markdown(rows))
    cnt = counts(rows)
    print("\n| verdict | cases | numbers |\n|---|---|---|")
    for v, ns in cnt.items():
        print(f"| {v} | {len(ns)} | {', '.join(map(str, ns))} |")
    errors = sorted(((r.seconds, r.command) for row in rows for r in row.runs
                     if r.role == "case" and r.rc not in (0, None)), reverse=True)
    print(f"\n`kdm --help`: {', '.join(f'{s:.2f}' for s in helps)} s; error exits: {len(errors)}, "
          f"{sum(s <= 0.5 for s, _ in errors)} within 0.5 s. Slowest error exits:\n\n| seconds | command |\n|---|---|")
    for s, cmd in errors[:25]:
        print(f"| {s:.2f} | `{shorten(cmd, 160)}` |")
    print(f"\ntotal {total:.0f} s in {workdir}")
    unclear = [r for r in rows if r.verdict != "clear"]
    print(f"battery: {len(rows) - len(unclear)} of {len(rows)} cases clear"
          + (": not clear " + ", ".join(f"#{r.number} ({r.verdict})" for r in unclear) if unclear else ""),
          file=sys.stderr, flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({
            "repo": str(b.repo), "workdir": str(workdir), "total_seconds": round(total, 1), "help_seconds": helps,
            "fixtures": b.built, "counts": {k: len(v) for k, v in cnt.items()},
            "rows": [{"number": r.number, "what": r.what, "verdict": r.verdict, "why": r.why, "notes": r.notes,
                      "seconds": round(r.seconds, 2), "runs": [x.row() for x in r.runs]} for r in rows]}, indent=2))
    if own_dir and not a.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if unclear else 0


if __name__ == "__main__":
    sys.exit(main())
