#!/usr/bin/env python
"""Issue 26 in one GPU call: the official KDM training step as it runs against the engine's, for the
presets' objectives, and the rest of the speed goals as far as the time allows.

    bash bench/issue26_gpu.sh                     # on the GPU machine, from the repository root: set-up, then this
    python bench/speed_vs_official.py --official-dir /tmp/kdm-official --out-dir OUT --budget-s 540
    python bench/speed_vs_official.py --device cpu --tiny --official-json FILE --archive TGZ --out-dir OUT  # CPU check

Parts, in this order; each runs in its own process under a time limit, and a part whose estimate exceeds
the budget left is skipped (recorded as such). The JSON is rewritten after every part, so a call cut off
keeps what it measured.

* ``official``: ``official_kdm_step.py`` in ``--official-dir`` (laid out as its header says: the official
  code in DIR/kdm, the script in DIR, piq installed): the official cifar10 training step at batch 128 with
  torch's default math modes (TF32 convolutions on, cuDNN autotuning off), Huber + D and LPIPS (VGG16,
  random weights: same compute) + D, their peak memory, and its one-step sampling at batch 1000.
  ``--official-json`` reads such a result instead (CPU checks, re-analysis).
* ``engine``: ``bench_kdm_image.py`` on the same U-Nets, batch and data shapes, for the objectives the
  presets train (pseudo-Huber and lpips-own, each with and without the discriminator): the engine as the
  presets run it (bf16, NCHW, whole-step CUDA graph), lpips-own also channels_last (the full preset's
  layout choice for that distance), one eager NCHW step (host time, kernels launched), the fp32 reference
  with TF32 off, and with the profile: GPU time by kernel class, kernels per step, idle GPU time per step.
* ``mini``: the mini preset's student (64 channels, 1 block, lpips-own, batch 256) as a bare step
  (``bench_kdm_image.py --student mini``) and through the product's training loop on a pair store
  (``mini_student_speed.py``: the steady-state pairs/s the student stage logs); goal: the stage at >= 90 %.
* ``teacher``: ``kdm dataset prepare`` of the CIFAR-10 archive and the mini teacher's full run (1,500 steps,
  a log record every 100) with the per-interval readings of ``pipeline.training.monitor`` (steady-state
  images/s, host CPU time per step, GPU SM clock, temperature, power, clock-event reasons, processes on the
  GPU): whether it slows down, and with what.
* ``pairs``: ``bench_pair_sampler.py``, EDM's generate.py as it runs (reference) against fp16 + compile on the
  EDM DDPM++ network, drift on the mini teacher of the part before.
* ``sampling``: ``bench_kdm_image.py``'s compiled bf16 one-step sampler at batch 1000 (goal: >= 15k images/s).

Writes OUT/speed-vs-official.json and OUT/speed-vs-official.md (the BENCHMARKS.md rows, with the ratios).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(0, str(REPO))

PARTS = ("official", "engine", "mini", "teacher", "pairs", "sampling")
# Seconds each part is expected to take on one H100 (a part starts only if this much budget is left).
ESTIMATE_S = {"official": 60, "engine": 150, "mini": 90, "teacher": 150, "pairs": 150, "sampling": 150}
OBJECTIVES = ("pseudo-huber+D", "pseudo-huber", "lpips-own+D", "lpips-own")
# the official run each objective is compared with: its step with the same family of distance (always with D)
OFFICIAL_OF = {"pseudo-huber+D": "Huber", "pseudo-huber": "Huber", "lpips-own+D": "LPIPS", "lpips-own": "LPIPS"}
FAMILY = {"Huber": "Huber", "LPIPS": "perceptual"}
GOAL_STEP_SPEEDUP = 4.0
GOAL_MINI_STAGE_FRACTION = 0.9
GOAL_PAIRS_SPEEDUP = 3.5
GOAL_SAMPLING = 15_000
GOAL_DRIFT_MEAN = 2 / 255
OUT_NAME = "speed-vs-official"
VARIANT_TEXT = {"graphs-nchw": "bf16, NCHW, whole-step CUDA graph (the presets' path)",
                "fp32-nchw": "fp32, NCHW, eager (the CPU check)"}


# --- summaries (pure functions of the parts' JSON: tested on the CPU) -----------------------------------

def engine_rows(engine: dict, variant_key: str) -> dict:
    """{objective: {ms_per_step, peak_gib, pairs_per_s, profile summary}} of one engine variant."""
    rows = {}
    for obj in OBJECTIVES:
        key = variant_key if obj == "pseudo-huber+D" else f"{variant_key}@{obj}"
        r = engine.get("train_step", {}).get(key)
        if not r or "step_s" not in r:
            continue
        row = {"result": key, "ms_per_step": 1e3 * r["step_s"], "peak_gib": r.get("peak_mem_gib"),
               "pairs_per_s": r.get("pairs_per_s")}
        prof = r.get("profile") or {}
        if prof:
            row.update(gpu_ms_per_step=prof["gpu_ms_per_call"], gpu_idle_ms_per_step=prof.get("gpu_idle_ms_per_step"),
                       kernels_per_step=prof["launches_per_call"], ms_by_class=prof["ms_by_class"])
        rows[obj] = row
    return rows


def compare(official: dict, rows: dict) -> dict:
    """Official step time / engine step time per objective (the official run of the same distance family,
    which always trains D: the objectives without D are the presets' and are compared with it too)."""
    out = {}
    for obj, row in rows.items():
        loss = OFFICIAL_OF[obj]
        off_s = official.get(f"official_step_s_b128_{loss}")
        if off_s is None:
            continue
        ratio = 1e3 * off_s / row["ms_per_step"]
        out[obj] = {"family": FAMILY[loss], "official": f"{loss} + D", "official_ms_per_step": 1e3 * off_s,
                    "official_peak_gib": official.get(f"official_peak_GiB_{loss}"),
                    "engine_ms_per_step": row["ms_per_step"], "engine_peak_gib": row["peak_gib"],
                    "speedup": ratio, "goal": GOAL_STEP_SPEEDUP, "met": ratio >= GOAL_STEP_SPEEDUP}
    return out


def mini_summary(bench: dict, stage: dict, variant_key: str, row: str) -> dict:
    """The mini student's bare step (bench) against the stage's steady-state rate; goal: >= 90 %."""
    r = bench.get("train_step", {}).get(f"{variant_key}@lpips-own") or {}
    s = stage.get("rows", {}).get(row) or {}
    out = {"bench_result": f"{variant_key}@lpips-own", "stage_row": row, "batch": bench.get("info", {}).get("batch"),
           "bench_pairs_per_s": r.get("pairs_per_s"), "bench_peak_gib": r.get("peak_mem_gib"),
           "stage_steady_pairs_per_s": s.get("steady_pairs_per_s"), "stage_wall_pairs_per_s": s.get("pairs_per_s"),
           "goal": GOAL_MINI_STAGE_FRACTION}
    if out["bench_pairs_per_s"] and out["stage_steady_pairs_per_s"]:
        out["stage_over_bench"] = out["stage_steady_pairs_per_s"] / out["bench_pairs_per_s"]
        out["met"] = out["stage_over_bench"] >= GOAL_MINI_STAGE_FRACTION
    return out


def _span(recs: list[dict], key: str) -> Optional[list]:
    vals = [r[key] for r in recs if isinstance(r.get(key), (int, float))]
    return [min(vals), max(vals)] if vals else None


def teacher_summary(records: list[dict], batch: int) -> dict:
    """Whether a teacher run slowed down between its first and last steady interval, and what came with it:
    a lower SM clock or active power/thermal reasons (the machine), more processes or foreign memory on the
    GPU (sharing), more host CPU time per step or load (the host)."""
    steady = [r for r in records if isinstance(r.get("train_images_per_s"), (int, float))]
    out: dict = {"intervals": len(records), "steady_intervals": len(steady), "batch": batch,
                 "steps_per_s": [round(r["train_images_per_s"] / batch, 2) for r in steady]}
    if len(steady) < 2:
        out["verdict"] = "too few steady intervals to compare"
        return out
    first, last = steady[0], steady[-1]
    slow = last["train_images_per_s"] / first["train_images_per_s"]
    out.update(first_steps_per_s=first["train_images_per_s"] / batch, last_steps_per_s=last["train_images_per_s"] / batch,
               last_over_first=slow,
               min_over_first=min(r["train_images_per_s"] for r in steady) / first["train_images_per_s"])
    for key in ("gpu_sm_mhz", "gpu_temp_c", "gpu_power_w", "gpu_processes", "host_cpu_ms_per_step", "load_avg_1m"):
        out[f"{key}_range"] = _span(steady, key)
    reasons = sorted({x for r in steady for x in (r.get("gpu_clock_reasons") or [])})
    out["gpu_clock_reasons_seen"] = reasons
    foreign = [r["gpu_mem_used_mib"] - r["gpu_mem_own_mib"] for r in steady
               if isinstance(r.get("gpu_mem_used_mib"), (int, float)) and isinstance(r.get("gpu_mem_own_mib"), (int, float))]
    out["gpu_foreign_mem_mib_max"] = max(foreign) if foreign else None
    notes = [r["gpu_note"] for r in records if r.get("gpu_note")]
    if notes:
        out["gpu_note"] = notes[0]
    causes = []
    if slow >= 0.9:
        out["verdict"] = f"no slowdown: the last steady interval ran at {slow:.2f} of the first's rate"
        return out
    procs = out["gpu_processes_range"]
    if (procs and procs[1] > 1) or (foreign and max(foreign) > 2048):
        causes.append("another process on the GPU")
    clock_first, clock_last = first.get("gpu_sm_mhz"), last.get("gpu_sm_mhz")
    if (clock_first and clock_last and clock_last / clock_first < 0.9) or \
            {"sw_power_cap", "hw_slowdown", "sw_thermal", "hw_thermal", "hw_power_brake"} & set(reasons):
        causes.append(f"GPU clock (SM {clock_first} -> {clock_last} MHz, reasons {', '.join(reasons) or 'none'})")
    h_first, h_last = first.get("host_cpu_ms_per_step"), last.get("host_cpu_ms_per_step")
    if h_first and h_last and h_last / h_first > 1.25:
        causes.append(f"host CPU time per step ({h_first:.1f} -> {h_last:.1f} ms)")
    out["verdict"] = (f"slowed to {slow:.2f} of the first steady interval's rate; with it: "
                      + ("; ".join(causes) if causes else "no change of clock, sharing or host time recorded "
                                                           "(unexplained by these readings)"))
    return out


def pairs_summary(res: dict) -> dict:
    thr = res.get("throughput", {})
    ref = (thr.get("reference") or {}).get("pairs_per_s")
    fast = (thr.get("fp16-compile") or {}).get("pairs_per_s")
    drift = (res.get("drift") or {}).get("fp16-compile") or {}
    out = {"reference_pairs_per_s": ref, "fp16_compile_pairs_per_s": fast, "goal": GOAL_PAIRS_SPEEDUP,
           "drift_mean": drift.get("mean_abs"), "drift_max": drift.get("max_abs"), "drift_goal_mean": GOAL_DRIFT_MEAN,
           "drift_teacher": (res.get("drift") or {}).get("teacher")}
    if ref and fast:
        out["speedup"] = fast / ref
        out["met"] = out["speedup"] >= GOAL_PAIRS_SPEEDUP
    return out


def sampling_summary(res: dict, official: dict) -> dict:
    r = res.get("sampling", {}).get("bf16-sdpa-compile") or {}
    out = {"engine_images_per_s": r.get("images_per_s"), "batch": r.get("batch"),
           "official_images_per_s": official.get("official_sample_img_per_s_b1000"), "goal": GOAL_SAMPLING}
    if out["engine_images_per_s"]:
        out["met"] = out["engine_images_per_s"] >= GOAL_SAMPLING
    return out


def _f(x, fmt=".1f", none="-"):
    return none if x is None else format(x, fmt)


def markdown(rec: dict) -> str:
    """The BENCHMARKS.md fragment: the official code as it runs against the engine, then the other goals."""
    date, gpu = rec["date"][:10], rec.get("gpu") or rec["device"]
    off = rec.get("official", {})
    variant = rec.get("engine", {}).get("preset_path", {}).get("variant")
    how = VARIANT_TEXT.get(variant, variant or "-")
    lines = [f"### Official code as it runs (`bench/speed_vs_official.py`, {gpu}, {date}, torch {rec['torch']})", "",
             f"Official code: torch {off.get('torch', '-')}, cuDNN TF32 {off.get('cudnn_allow_tf32', '-')}, batch "
             f"128, its Adam, EMA and discriminator step; engine: {how}, same U-Nets and batch. Speedup = "
             f"official ms / engine ms (goal >= {GOAL_STEP_SPEEDUP:g}x).", "",
             "| family | official step | ms | peak GiB | engine objective | ms | peak GiB | speedup |",
             "|---|---|---|---|---|---|---|---|"]
    for obj, c in rec.get("comparison", {}).items():
        lines.append(f"| {c['family']} | {c['official']} | {_f(c['official_ms_per_step'])} | "
                     f"{_f(c['official_peak_gib'], '.2f')} | {obj} | {_f(c['engine_ms_per_step'])} | "
                     f"{_f(c['engine_peak_gib'], '.2f')} | **{c['speedup']:.2f}x** |")
    engine = rec.get("engine", {})
    prof = {f"{obj} ({part['variant']})": r for part in engine.values() if isinstance(part, dict)
            for obj, r in part["rows"].items() if "gpu_ms_per_step" in r}
    if prof:
        lines += ["", "| engine objective (variant) | ms/step | GPU busy ms | GPU idle ms | kernels | "
                      "top kernel classes (ms) |", "|---|---|---|---|---|---|"]
        for obj, r in prof.items():
            top = ", ".join(f"{k} {v:.1f}" for k, v in list((r.get("ms_by_class") or {}).items())[:4])
            lines.append(f"| {obj} | {_f(r['ms_per_step'])} | {_f(r.get('gpu_ms_per_step'))} | "
                         f"{_f(r.get('gpu_idle_ms_per_step'))} | {r.get('kernels_per_step', '-')} | {top} |")
    m = rec.get("mini")
    if m:
        lines += ["", f"Mini student (lpips-own, batch {m.get('batch')}): bare step {_f(m.get('bench_pairs_per_s'), ',.0f')} "
                      f"pairs/s, the student stage's steady state {_f(m.get('stage_steady_pairs_per_s'), ',.0f')} pairs/s "
                      f"= {_f(m.get('stage_over_bench'), '.2f')} of it (goal >= {GOAL_MINI_STAGE_FRACTION:g})."]
    t = rec.get("teacher")
    if t:
        lines += ["", f"Mini teacher, {t.get('steady_intervals')} steady intervals: {_f(t.get('first_steps_per_s'), '.1f')} -> "
                      f"{_f(t.get('last_steps_per_s'), '.1f')} steps/s; SM clock {t.get('gpu_sm_mhz_range')} MHz, "
                      f"temperature {t.get('gpu_temp_c_range')} C, power {t.get('gpu_power_w_range')} W, processes "
                      f"{t.get('gpu_processes_range')}; {t.get('verdict')}."]
    p = rec.get("pairs")
    if p:
        lines += ["", f"Teacher pairs (EDM DDPM++, Heun 35 NFE, batch 512): reference {_f(p.get('reference_pairs_per_s'))} "
                      f"pairs/s, fp16 + compile {_f(p.get('fp16_compile_pairs_per_s'))} = {_f(p.get('speedup'), '.2f')}x "
                      f"(goal >= {GOAL_PAIRS_SPEEDUP:g}x); drift mean {_f(p.get('drift_mean'), '.2e')}, max "
                      f"{_f(p.get('drift_max'), '.2e')} (mini teacher)."]
    s = rec.get("sampling")
    if s:
        lines += ["", f"One-step sampling, batch 1000: engine {_f(s.get('engine_images_per_s'), ',.0f')} images/s, "
                      f"official {_f(s.get('official_images_per_s'), ',.0f')} (goal >= {GOAL_SAMPLING:,})."]
    skipped = [f"{n} ({v['status']}{': ' + v['note'] if v.get('note') else ''})"
               for n, v in rec["parts"].items() if v["status"] != "ok"]
    if skipped:
        lines += ["", "Not measured in this call: " + "; ".join(skipped) + "."]
    return "\n".join(lines) + "\n"


# --- running the parts ------------------------------------------------------------------------------------

def gpu_name() -> Optional[str]:
    """The first GPU's name from nvidia-smi (the driver itself never opens a CUDA context)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    proc = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                          timeout=20)
    lines = proc.stdout.strip().splitlines()
    return lines[0].strip() if proc.returncode == 0 and lines else None


class Driver:
    def __init__(self, a):
        self.a = a
        self.t0 = time.time()
        self.out = Path(a.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="speed-vs-official-"))
        self.cuda = a.device.startswith("cuda")
        self.rec: dict = {"kind": OUT_NAME, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                          "device": a.device, "gpu": None, "torch": None, "python": platform.python_version(),
                          "tiny": a.tiny, "budget_s": a.budget_s, "parts": {}}
        import torch          # no CUDA context here: the parts' processes have the GPU to themselves
        self.rec["torch"] = torch.__version__
        if self.cuda:
            self.rec["gpu"] = gpu_name()

    def left(self) -> float:
        return self.a.budget_s - (time.time() - self.t0)

    def save(self) -> None:
        self.rec["wall_s"] = round(time.time() - self.t0, 1)
        (self.out / f"{OUT_NAME}.json").write_text(json.dumps(self.rec, indent=2) + "\n")
        (self.out / f"{OUT_NAME}.md").write_text(markdown(self.rec))

    def run(self, name: str, cmd: list[str], env: Optional[dict] = None, cwd: Optional[Path] = None) -> Optional[str]:
        """Run one command of a part under the budget left; returns None when it succeeded, else why not."""
        limit = self.left() - 5
        if limit <= 10:
            return "no time left"
        print(f"## {name}: {' '.join(cmd)}  (limit {limit:.0f} s)", flush=True)
        log = self.tmp / f"{name}.log"
        with log.open("a") as f:
            try:
                proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=limit, cwd=cwd,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1",
                                           **({"OMP_NUM_THREADS": "1"} if self.a.tiny else {}), **(env or {})})
            except subprocess.TimeoutExpired:
                return f"timed out after {limit:.0f} s"
        text = log.read_text()
        print(text[-4000:], flush=True)
        self.rec["parts"][name]["log_tail"] = text[-3000:]
        return None if proc.returncode == 0 else f"exit status {proc.returncode}"

    def part(self, name: str, fn) -> None:
        if name not in self.a.parts:
            return
        entry = self.rec["parts"][name] = {"status": "skipped"}
        need = 0 if self.a.tiny else ESTIMATE_S[name]
        if self.left() < need:
            entry["note"] = f"budget: {self.left():.0f} s left, about {need} s needed"
            self.save()
            return
        t = time.time()
        try:
            why = fn()
        except Exception as e:   # a part's failure is recorded; the next part still runs
            why = f"{type(e).__name__}: {e}"
        entry["seconds"] = round(time.time() - t, 1)
        if why is None:
            entry["status"] = "ok"
        else:
            entry["status"] = "skipped" if why.startswith("needs") else "failed"
            entry["note"] = why
        print(f"## {name}: {entry['status']} in {entry['seconds']} s {entry.get('note', '')}", flush=True)
        self.save()

    def py(self, script: str, *args: str) -> list[str]:
        return [sys.executable, str(BENCH / script), *args]

    # -- parts ------------------------------------------------------------------------------------------
    def official(self) -> Optional[str]:
        if self.a.official_json:
            self.rec["official"] = json.loads(Path(self.a.official_json).read_text())
            self.rec["official"]["source"] = str(self.a.official_json)
            return None
        if not self.cuda:
            return "needs CUDA (the official script runs on cuda only)"
        d = Path(self.a.official_dir)
        if not (d / "official_kdm_step.py").is_file() or not (d / "kdm").is_dir():
            return f"needs {d}/official_kdm_step.py and {d}/kdm (see its header)"
        out = self.tmp / "official"
        out.mkdir(exist_ok=True)
        why = self.run("official", [sys.executable, "official_kdm_step.py"], env={"OUT": str(out)}, cwd=d)
        if why is None:
            self.rec["official"] = json.loads((out / "official.json").read_text())
        return why

    def _variants(self) -> tuple[str, str]:
        # the presets' engine path on a GPU; on the CPU the same layout in fp32 (a plumbing check)
        return ("graphs-nchw", "engine_bf16_nchw_cuda_graphs") if self.cuda else ("fp32-nchw", "engine_fp32_tf32_nchw")

    def _size(self) -> list[str]:
        a = self.a
        return ["--tiny", "--batch", "2", "--steps", "1", "--warmup", "1"] if a.tiny else \
            ["--steps", str(a.steps), "--warmup", "5"]

    def engine(self) -> Optional[str]:
        v, key = self._variants()
        variants = [v] + (["graphs@lpips-own", "graphs@lpips-own+D", "nchw@pseudo-huber+D"] if self.cuda else [])
        out = self.tmp / "engine.json"
        cmd = self.py("bench_kdm_image.py", "--device", self.a.device, "--objectives", ",".join(OBJECTIVES),
                      "--variants", ",".join(variants), "--sampling", "none", "--out", str(out), *self._size())
        if self.cuda:
            cmd.append("--profile")
        if self.a.tiny:
            cmd.append("--skip-reference")
        why = self.run("engine", cmd)
        if out.exists():
            res = json.loads(out.read_text())
            self.rec["engine_raw"] = res
            self.rec["gpu"] = self.rec["gpu"] or res["info"].get("gpu")
            # the presets' path (the comparison's rows), then the layout and eager checks
            eng = self.rec["engine"] = {"preset_path": {"variant": v, "rows": engine_rows(res, key)}}
            if self.cuda:
                eng["graphs_channels_last"] = {"variant": "graphs", "rows": engine_rows(res, "engine_bf16_cuda_graphs")}
                eng["eager_nchw"] = {"variant": "nchw", "rows": engine_rows(res, "engine_bf16_nchw")}
            ref = res["train_step"].get("reference_fp32_eager") or {}
            if "step_s" in ref:
                eng["reference_fp32_no_tf32_ms"] = 1e3 * ref["step_s"]
            if "official" in self.rec:
                self.rec["comparison"] = compare(self.rec["official"], eng["preset_path"]["rows"])
        return why

    def mini(self) -> Optional[str]:
        v, key = self._variants()
        bench_out, stage_out = self.tmp / "mini-bench.json", self.tmp / "mini-stage.json"
        why = self.run("mini", self.py("bench_kdm_image.py", "--student", "mini", "--device", self.a.device,
                                       "--objectives", "lpips-own", "--variants", v, "--skip-reference",
                                       "--sampling", "none", "--out", str(bench_out), *self._size()))
        row = "preset" if self.cuda else "fp32"
        stage = ["--tiny", "--batch", "2", "--pairs", "64", "--steps", "4"] if self.a.tiny else \
            ["--steps", str(self.a.mini_steps)]
        why = self.run("mini", self.py("mini_student_speed.py", "--device", self.a.device, "--rows", row,
                                       "--out", str(stage_out), *stage)) or why
        if bench_out.exists() and stage_out.exists():
            self.rec["mini"] = mini_summary(json.loads(bench_out.read_text()), json.loads(stage_out.read_text()),
                                            key, row)
        return why

    def teacher(self) -> Optional[str]:
        archive = Path(self.a.archive)
        if not archive.is_file():
            return f"needs the CIFAR-10 archive at {archive}"
        out = self.tmp / "teacher.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "teacher-run", "--archive", str(archive),
               "--work", str(self.tmp / "teacher"), "--device", self.a.device, "--out", str(out)]
        if self.a.tiny:
            cmd.append("--tiny")
        why = self.run("teacher", cmd)
        if out.exists():
            res = json.loads(out.read_text())
            self.rec["teacher"] = res["summary"]
            self.rec["teacher_records"] = res["records"]
            self.teacher_uri = res["teacher"]
        else:      # cut off: the records the run logged so far (its work directory is <uri>.partial)
            from pipeline.storage import checkpoints
            from storage_schemas.distill_image import TEACHER_MINI
            logs = sorted((self.tmp / "teacher").glob("teacher*/metrics.jsonl"))
            records = checkpoints.read_metrics(logs[0]) if logs else []
            if records:
                batch = TINY_TEACHER_BATCH if self.a.tiny else TEACHER_MINI.batch_size
                self.rec["teacher"] = {**teacher_summary(records, batch), "cut_off_at_step": records[-1]["step"]}
                self.rec["teacher_records"] = records
        return why

    def pairs(self) -> Optional[str]:
        if not self.cuda:
            return "needs CUDA (EDM's DDPM++ network at batch 512)"
        out = self.tmp / "pairs.json"
        cmd = self.py("bench_pair_sampler.py", "--variants", "reference,fp16-compile", "--batches", "2",
                      "--out", str(out))
        if getattr(self, "teacher_uri", None):
            cmd += ["--teacher", self.teacher_uri]
        why = self.run("pairs", cmd)
        if out.exists():
            res = json.loads(out.read_text())
            self.rec["pairs_raw"] = res
            self.rec["pairs"] = pairs_summary(res)
        return why

    def sampling(self) -> Optional[str]:
        if not self.cuda:
            return "needs CUDA (the compiled sampler)"
        out = self.tmp / "sampling.json"
        why = self.run("sampling", self.py("bench_kdm_image.py", "--skip-reference", "--variants", "none",
                                           "--sampling", "bf16-sdpa-compile", "--sample-batch", "1000",
                                           "--out", str(out)))
        if out.exists():
            self.rec["sampling"] = sampling_summary(json.loads(out.read_text()), self.rec.get("official", {}))
        return why

    def main(self) -> dict:
        for name in PARTS:
            self.part(name, getattr(self, name))
        for name in self.a.parts:
            if name not in self.rec["parts"]:
                self.rec["parts"][name] = {"status": "skipped", "note": "not a part"}
        self.save()
        if self.a.keep_logs:     # one file (the GPU machine returns few files): every part's whole log
            with (self.out / f"{OUT_NAME}-parts.log").open("w") as f:
                for name in PARTS:
                    log = self.tmp / f"{name}.log"
                    if log.exists():
                        f.write(f"===== {name}\n{log.read_text()}\n")
        shutil.rmtree(self.tmp, ignore_errors=True)
        print((self.out / f"{OUT_NAME}.md").read_text(), flush=True)
        return self.rec


# --- the teacher part (its own process) -----------------------------------------------------------------

TINY_TEACHER_BATCH = 8
TINY_TEACHER_SETS = ["unet.model_channels=8", "unet.channel_mult=[1,2]", "unet.num_blocks=1",
                     "unet.attn_resolutions=[4]", f"batch_size={TINY_TEACHER_BATCH}", "steps=6", "checkpoint_every=3", "log_every=2",
                     "preview_samples=0", "lr_rampup_images=16", "ema_halflife_images=32"]


def teacher_run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="speed_vs_official.py teacher-run")
    p.add_argument("--archive", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    from pipeline.data.datasets import prepare_image_dataset
    from pipeline.storage import checkpoints
    from pipeline.teachers.bootstrap import load_edm_teacher_config, train_edm_teacher
    work = Path(a.work)
    t = time.time()
    prepare_image_dataset(a.archive, str(work / "ds"), progress=False)
    prep_s = time.time() - t
    cfg = load_edm_teacher_config("cifar10-mini", sets=[f"device={a.device}", *(TINY_TEACHER_SETS if a.tiny else [])])
    uri = str(work / "teacher")
    t = time.time()
    train_edm_teacher(str(work / "ds"), cfg, uri, progress=False)
    train_s = time.time() - t
    records = checkpoints.read_metrics(Path(uri) / checkpoints.METRICS_FILE)
    summary = {"dataset_prepare_s": round(prep_s, 1), "teacher_stage_s": round(train_s, 1), "steps": cfg.steps,
               **teacher_summary(records, cfg.batch_size)}
    Path(a.out).write_text(json.dumps({"teacher": uri, "summary": summary, "records": records}, indent=2) + "\n")
    print(json.dumps(summary, indent=1), flush=True)
    return 0


def main(argv: Optional[list[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["teacher-run"]:
        sys.exit(teacher_run(argv[1:]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny networks, 1-step timings (a CPU check of the plumbing)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--budget-s", type=float, default=540.0, help="seconds for all parts together")
    ap.add_argument("--official-dir", default="/tmp/kdm-official",
                    help="official_kdm_step.py and the official code (kdm/) laid out as the script's header says")
    ap.add_argument("--official-json", default=None, help="use this official result instead of running the script")
    ap.add_argument("--archive", default=str(REPO / ".data" / "cifar10-jpeg.tar.gz"), help="CIFAR-10 archive")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per engine variant (after 5 warm-up steps)")
    ap.add_argument("--mini-steps", type=int, default=200, help="steps of the mini student stage run")
    ap.add_argument("--keep-logs", action="store_true",
                    help=f"write every part's whole log to OUT/{OUT_NAME}-parts.log")
    ap.add_argument("--out-dir", default=str(REPO / "docs" / "bench"))
    a = ap.parse_args(argv)
    a.parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    bad = [x for x in a.parts if x not in PARTS]
    if bad:
        ap.error(f"unknown parts {bad}; valid: {', '.join(PARTS)}")
    return Driver(a).main()


if __name__ == "__main__":
    main()
