#!/usr/bin/env python
"""Pair-generation throughput of EDM's deterministic Heun sampler: reference vs fast path, and their drift.

    python bench/bench_pair_sampler.py --out runs/bench-pairs.json                      # EDM DDPM++ architecture
    python bench/bench_pair_sampler.py --teacher runs/cifar10/teacher --out ...          # + drift on trained weights

(a) ``reference``: EDM's generate.py exactly: float32 network under torch's default math modes (TF32 for
    cuDNN convolutions, full float32 matmuls), NCHW, the Heun state in float64, EDM's AttentionOp
    (``fp32-strict`` also turns TF32 off for the convolutions, for information). (b) fast variants: float32 + TF32; bf16 autocast + channels_last + fused attention
    (models.edm.FastDenoiser), eager or torch.compile (default mode; ``-compile-max``: max-autotune without CUDA
    graphs; ``-compile-graphs``: reduce-overhead, i.e. CUDA graphs); the same in fp16 (EDM's own reduced precision, three
    more mantissa bits than bf16); the Heun state in float32. Throughput is measured on the
    EDM CIFAR-10 DDPM++ network (55.7M parameters; speed does not depend on the weight values, and EDM's
    checkpoints cannot be downloaded here) at 18 steps = 35 NFE. Drift needs trained weights (an untrained
    EDM network outputs exactly c_skip * x, which is trivial to integrate): ``--teacher`` names a teacher artifact
    whose x_0 of (b) is compared with (a) on the same seeds: mean and max |x_0(b) - x_0(a)| in [-1, 1] units
    (goal: mean < 2/255, one 8-bit level).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from models.edm import FastDenoiser  # noqa: E402
from models.songunet import use_box_resampling  # noqa: E402
from models.samplers import edm_heun, edm_latents  # noqa: E402
from pipeline.devices import resolve_device
from timing import kernel_breakdown, sync  # noqa: E402

VARIANTS = ("reference", "fp32-strict", "tf32", "bf16", "bf16-compile", "fp16", "fp16-compile", "fp16-compile-max",
            "fp16-compile-graphs", "fp16-compile-max-graphs")
COMPILE_MODES = {"-compile": None, "-compile-max": "max-autotune-no-cudagraphs", "-compile-graphs": "reduce-overhead",
                 "-compile-max-graphs": "max-autotune"}


def edm_cifar10_denoiser(device: torch.device) -> torch.nn.Module:
    """EDM's CIFAR-10 DDPM++ network (the cifar10-edm preset's architecture), freshly initialised."""
    from pipeline.teachers.bootstrap import build_edm_network, load_edm_teacher_config, net_config
    cfg = load_edm_teacher_config("cifar10-edm")
    torch.manual_seed(0)
    return build_edm_network(net_config(cfg, (3, 32, 32), 0)).to(device).eval().requires_grad_(False)


def make(variant: str, build) -> tuple[torch.nn.Module, torch.dtype]:
    """The denoiser of a variant and its Heun state dtype (TF32 is a process-wide switch set here)."""
    torch.backends.cuda.matmul.allow_tf32 = variant == "tf32"          # torch's defaults: False, True
    torch.backends.cudnn.allow_tf32 = variant != "fp32-strict"
    net = build()
    if variant in ("reference", "fp32-strict"):     # EDM's kernels: grouped resampling convolutions
        use_box_resampling(net, False)
    if variant in ("reference", "fp32-strict", "tf32"):
        return net, (torch.float32 if variant == "tf32" else torch.float64)
    dtype = torch.float16 if variant.startswith("fp16") else torch.bfloat16
    suffix = variant[variant.index("-compile"):] if "-compile" in variant else None
    return FastDenoiser(net, compile=suffix is not None, dtype=dtype,
                        compile_mode=COMPILE_MODES.get(suffix)), torch.float32


def sample(den, seeds: list[int], steps: int, state_dtype, device) -> torch.Tensor:
    eps, _ = edm_latents(seeds, (3, 32, 32), 0)
    return edm_heun(den, (eps * 80.0).to(device), None, num_steps=steps, state_dtype=state_dtype)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--batches", type=int, default=2, help="timed batches per variant (after one warm-up)")
    ap.add_argument("--steps", type=int, default=18, help="Heun noise levels (18 = 35 NFE)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--teacher", default=None, help="teacher artifact for the drift measurement")
    ap.add_argument("--drift-seeds", type=int, default=512)
    ap.add_argument("--profile", action="store_true",
                    help="also profile one denoiser call per variant: GPU time by kernel class, and the pairs/s "
                         "bound if only the convolutions/GEMMs and attention remained")
    ap.add_argument("--tiny", action="store_true", help="a tiny network (smoke test on the CPU)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    device = resolve_device(a.device)
    variants = [v for v in a.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; valid: {', '.join(VARIANTS)}")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    res: dict = {"info": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "gpu": gpu,
                          "torch": torch.__version__, "python": platform.python_version(), "batch": a.batch,
                          "steps": a.steps, "nfe": 2 * a.steps - 1}, "throughput": {}, "drift": {}}

    if a.tiny:
        from models.edm import EDMPrecond
        build = lambda: EDMPrecond(32, 3, model_channels=16, channel_mult=[1, 2], num_blocks=1,  # noqa: E731
                                   attn_resolutions=[16]).to(device).eval().requires_grad_(False)
    else:
        build = lambda: edm_cifar10_denoiser(device)  # noqa: E731
    res["info"]["parameters"] = sum(p.numel() for p in build().parameters())
    print(f"# {res['info']['date']} {gpu or 'cpu'} torch {torch.__version__}: {res['info']['parameters']:,} "
          f"parameters, batch {a.batch}, {a.steps} steps ({2 * a.steps - 1} NFE)", flush=True)
    seeds = list(range(a.batch))
    for v in variants:
        den, sd = make(v, build)
        t = time.time()
        sample(den, seeds, a.steps, sd, device)
        sync(device)
        warm = time.time() - t
        t = time.time()
        for i in range(a.batches):
            sample(den, [s + (i + 1) * a.batch for s in seeds], a.steps, sd, device)
        sync(device)
        dt = (time.time() - t) / a.batches
        r = {"pairs_per_s": a.batch / dt, "batch_s": dt, "warmup_s": warm}
        if device.type == "cuda":
            r["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        res["throughput"][v] = r
        print(f"{v:14s} {r['pairs_per_s']:9.1f} pairs/s  ({dt:.2f} s per batch, warm-up {warm:.1f} s)", flush=True)
        if a.profile:
            x = torch.randn(a.batch, 3, 32, 32, device=device)
            sigma = torch.tensor(1.0, dtype=sd, device=device)
            kb = kernel_breakdown(lambda: den(x.to(sd), sigma, None), device, calls=3)
            if kb:
                core = kb["ms_by_class"].get("conv_gemm", 0.0) + kb["ms_by_class"].get("attention", 0.0)
                kb["pairs_per_s_bound_core_kernels_only"] = a.batch / ((2 * a.steps - 1) * core / 1e3) if core else None
                r["profile"] = kb
                print(f"   profile: {kb['gpu_ms_per_call']:.1f} GPU ms per call, {kb['launches_per_call']} launches; "
                      + ", ".join(f"{k} {ms:.1f}" for k, ms in kb["ms_by_class"].items())
                      + f"; bound {kb['pairs_per_s_bound_core_kernels_only'] or 0:.0f} pairs/s", flush=True)
        del den
    ref = res["throughput"].get("reference")
    if ref:
        res["speedup_vs_reference"] = {v: r["pairs_per_s"] / ref["pairs_per_s"] for v, r in res["throughput"].items()}

    if a.teacher:
        from pipeline.teachers.flow_matching import load_denoiser
        drift_seeds = list(range(10**6, 10**6 + a.drift_seeds))
        load = lambda: load_denoiser(a.teacher, str(device))[0]  # noqa: E731
        den, sd = make("reference", load)
        x_ref = sample(den, drift_seeds, a.steps, sd, device).to(torch.float64)
        res["drift"]["teacher"] = a.teacher
        for v in variants:
            if v == "reference":
                continue
            den, sd = make(v, load)
            d = (sample(den, drift_seeds, a.steps, sd, device).to(torch.float64) - x_ref).abs()
            res["drift"][v] = {"mean_abs": float(d.mean()), "max_abs": float(d.max()),
                               "mean_in_8bit_levels": float(d.mean()) * 127.5, "n": len(drift_seeds)}
            print(f"drift {v:14s} mean {float(d.mean()):.2e}  max {float(d.max()):.2e}  "
                  f"(goal mean < {2 / 255:.2e})", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
