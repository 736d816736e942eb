"""Readings that explain a training run's speed, logged with each metrics record.

``GpuReadings``: the GPU's SM and memory clocks (and the maximum SM clock), temperature, power draw and
limit, utilisation, the active clock-event (throttle) reasons, the memory used on the card against this
process's own, and the number of compute processes on it, from ``nvidia-smi`` (one query per record,
about 50 ms; its time is left out of the logged steady-state rates). A slowdown that comes with a lower SM
clock is the machine's (power or thermal capping); one that comes with more processes, or much more
memory used than the process holds, is another job sharing the GPU. Only on CUDA devices; where
``nvidia-smi`` is absent or fails, the first record carries ``gpu_note`` saying why, a warning is logged,
and no further queries are made.

``HostReadings``: the process's CPU time per step over the interval (all its threads: the training loop
and the data-reading threads) and the machine's 1-minute load average. A host-bound step that slows down
while the load average rises is CPU contention on the host, not the GPU.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
import uuid
from typing import Callable, Optional

import torch

log = logging.getLogger("kdm.monitor")

# (nvidia-smi --query-gpu field, record key); values are numbers (MHz, degrees C, W, %, MiB) or None.
GPU_QUERY = (("clocks.sm", "gpu_sm_mhz"), ("clocks.max.sm", "gpu_sm_max_mhz"), ("clocks.mem", "gpu_mem_mhz"),
             ("temperature.gpu", "gpu_temp_c"), ("power.draw", "gpu_power_w"), ("power.limit", "gpu_power_limit_w"),
             ("utilization.gpu", "gpu_util_pct"), ("memory.used", "gpu_mem_used_mib"))
# The active clock-event reasons (a bit mask); drivers before 535 know the field only by its old name.
REASON_FIELDS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")
REASON_BITS = {0x1: "idle", 0x2: "applications_clocks", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
               0x10: "sync_boost", 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake",
               0x100: "display_clocks"}
TIMEOUT_S = 10.0

Runner = Callable[..., subprocess.CompletedProcess]


def decode_reasons(mask: str) -> Optional[list[str]]:
    """'0x0000000000000004' -> ['sw_power_cap']; [] when none is active; None when not a number."""
    try:
        bits = int(mask, 16)
    except (TypeError, ValueError):
        return None
    names = [name for bit, name in REASON_BITS.items() if bits & bit]
    rest = bits & ~sum(REASON_BITS)
    return names + ([hex(rest)] if rest else [])


def _number(text: str) -> Optional[float]:
    """A CSV value of nvidia-smi as a number; None for '[N/A]', '[Not Supported]' and the like."""
    try:
        return float(text.strip())
    except ValueError:
        return None


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def uuid_selector(value) -> Optional[str]:
    """'GPU-<uuid>' from torch's device-properties uuid (its 16 bytes, or a text holding the UUID); None
    when it is neither."""
    raw = getattr(value, "bytes", None)
    if raw is not None and len(bytes(raw)) == 16:
        return f"GPU-{uuid.UUID(bytes=bytes(raw))}"
    found = _UUID.search(str(value)) if value is not None else None
    return f"GPU-{found.group(0).lower()}" if found else None


def gpu_selectors(device: torch.device) -> list[str]:
    """What ``nvidia-smi -i`` may take for this CUDA device, best first: its UUID (the same whatever
    CUDA_VISIBLE_DEVICES does to the numbering), then the index CUDA_VISIBLE_DEVICES maps it to."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    by_uuid = uuid_selector(getattr(torch.cuda.get_device_properties(index), "uuid", None))
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    by_index = visible[index] if index < len(visible) else str(index)
    return [x for x in (by_uuid, by_index) if x]


class GpuReadings:
    """``read()`` -> the GPU fields of one metrics record (see the module docstring); {} off CUDA."""

    def __init__(self, device: torch.device, runner: Runner = subprocess.run, exe: Optional[str] = None,
                 selector: Optional[str] = None):
        self.device, self.runner = device, runner
        self.enabled = device.type == "cuda"
        self.note: Optional[str] = None
        self._reason_fields = list(REASON_FIELDS)
        self._exe = exe
        self._selector = selector
        if self.enabled and self._exe is None:
            self._exe = shutil.which("nvidia-smi")
            if self._exe is None:
                self._fail("nvidia-smi is not on PATH")

    def _fail(self, why: str) -> None:
        self.note = f"GPU readings unavailable: {why}"
        self.enabled = False
        log.warning("%s; metrics records carry no GPU clocks, temperature or power", self.note)

    def _run(self, args: list[str]) -> str:
        proc = self.runner([self._exe, *args], capture_output=True, text=True, timeout=TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"`nvidia-smi {' '.join(args)}` exited with {proc.returncode}: "
                               f"{(proc.stderr or proc.stdout).strip()[:200]}")
        return proc.stdout

    def _query(self, sel: str) -> dict:
        base = [f for f, _ in GPU_QUERY]
        error: Optional[RuntimeError] = None
        for reason in [*self._reason_fields, None]:      # an older driver knows the reasons by the old name
            fields = base + ([reason] if reason else [])
            try:
                out = self._run([f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits", "-i", sel])
            except RuntimeError as e:
                error = e
                continue
            self._reason_fields = [reason] if reason else []     # what this nvidia-smi answers, from now on
            break
        else:
            raise error
        lines = [ln for ln in out.splitlines() if ln.strip()]
        values = [v.strip() for v in lines[0].split(",")] if lines else []
        if len(values) != len(fields):
            raise RuntimeError(f"unexpected nvidia-smi output {out.strip()[:200]!r} for {len(fields)} fields")
        rec = {key: _number(v) for (_, key), v in zip(GPU_QUERY, values)}
        if self._reason_fields:
            rec["gpu_clock_reasons"] = decode_reasons(values[len(base)])
        apps = self._run(["--query-compute-apps=pid", "--format=csv,noheader", "-i", sel])
        rec["gpu_processes"] = sum(1 for ln in apps.splitlines() if ln.strip())
        return rec

    def read(self) -> dict:
        if not self.enabled:
            note, self.note = self.note, None        # the note goes into one record only
            return {"gpu_note": note} if note else {}
        try:
            selectors = [self._selector] if self._selector else gpu_selectors(self.device)
            for i, sel in enumerate(selectors):
                try:
                    rec = self._query(sel)
                    break
                except RuntimeError:        # e.g. a UUID this nvidia-smi does not know: the next selector
                    if i == len(selectors) - 1:
                        raise
            self._selector = sel                # the one that answered, from now on
        except (OSError, RuntimeError, subprocess.TimeoutExpired, IndexError) as e:
            self._fail(f"{type(e).__name__}: {e}")
            return self.read()
        rec["gpu_mem_own_mib"] = self._own_mib()
        return rec

    def _own_mib(self) -> Optional[float]:
        """The memory this process's caching allocator holds on the GPU (None before CUDA is initialised)."""
        if not torch.cuda.is_initialized():
            return None
        return round(torch.cuda.memory_reserved(self.device) / 2 ** 20, 1)


class HostReadings:
    """``read(steps)`` -> the process's CPU milliseconds per step since the previous call (all threads),
    the CPU cores it kept busy on average, and the 1-minute load average."""

    def __init__(self):
        self._cpu, self._wall = time.process_time(), time.perf_counter()

    def read(self, steps: int) -> dict:
        cpu, wall = time.process_time(), time.perf_counter()
        d_cpu, d_wall = cpu - self._cpu, wall - self._wall
        self._cpu, self._wall = cpu, wall
        rec = {"host_cpu_ms_per_step": round(1e3 * d_cpu / steps, 3) if steps > 0 else None,
               "host_cpu_cores": round(d_cpu / d_wall, 2) if d_wall > 0 else None}
        if hasattr(os, "getloadavg"):
            rec["load_avg_1m"] = round(os.getloadavg()[0], 2)
        return rec


def interval_probes(device: torch.device) -> list[Callable[[int], dict]]:
    """The readings a training loop logs with each record on ``device`` (host always, GPU on CUDA)."""
    host = HostReadings()
    probes: list[Callable[[int], dict]] = [host.read]
    if device.type == "cuda":
        gpu = GpuReadings(device)
        probes.append(lambda steps: gpu.read())
    return probes
