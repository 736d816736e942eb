"""Measurement helpers shared by the benchmarks: device sync, peak memory, timed loops."""
from __future__ import annotations

import gc
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    """Free what the previous measurement left (objects in reference cycles too, e.g. a trainer holding a
    captured CUDA graph) and restart the peak-memory count, so the next peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def time_steps(fn, device: torch.device, warmup: int, steps: int) -> dict:
    """``warmup`` untimed calls of ``fn``, then the mean time of ``steps`` calls (device synchronised)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(device)
    t1 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    t2 = time.perf_counter()
    return {"warmup_s": t1 - t0, "step_s": (t2 - t1) / steps, "steps": steps, "warmup": warmup,
            "peak_mem_gib": peak_gib(device)}


KERNEL_CLASSES = (   # (class, substrings of a CUDA kernel name), first match wins
    ("attention", ("flash", "fmha", "attention", "softmax")),
    ("conv_gemm", ("conv", "gemm", "cutlass", "xmma", "fprop", "dgrad", "wgrad", "cudnn", "sm90_", "sm80_", "nvjet")),
    ("fused_triton", ("triton",)),
    ("copy", ("copy", "cast", "elementwise_kernel_with_index", "direct_copy")),
    ("norm", ("norm", "welford")),
)


def classify_kernel(name: str) -> str:
    low = name.lower()
    for cls, keys in KERNEL_CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def kernel_breakdown(fn, device: torch.device, calls: int = 1, top: int = 12) -> dict:
    """GPU time of ``calls`` calls of ``fn`` by kernel class (convolution/GEMM, attention, fused Triton,
    copies, norms, other) and the ``top`` kernels, from torch.profiler; ms per call. On the CPU: {}."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    by_class: dict[str, float] = {}
    kernels = []
    launches = 0
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None)
        if t is None:
            t = getattr(ev, "self_cuda_time_total", 0.0)
        if not t:
            continue
        ms = t / 1e3 / calls
        cls = classify_kernel(ev.key)
        by_class[cls] = by_class.get(cls, 0.0) + ms
        kernels.append((ms, ev.key[:120], cls, ev.count // calls))
        launches += ev.count
    kernels.sort(reverse=True)
    total = sum(by_class.values())
    return {"gpu_ms_per_call": total, "ms_by_class": dict(sorted(by_class.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"ms": ms, "name": n, "class": c, "launches": k} for ms, n, c, k in kernels[:top]],
            "launches_per_call": launches // calls}
