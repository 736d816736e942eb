"""Measurement helpers shared by the benchmarks: device sync, peak memory, timed loops."""
from __future__ import annotations

import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
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
