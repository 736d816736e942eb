"""Speed readings of training logs: steady-state rates of MetricsLog, nvidia-smi GPU readings, host readings."""
from __future__ import annotations

import logging
import subprocess

import pytest
import torch

from pipeline.storage import checkpoints
from pipeline.training import monitor
from pipeline.training.monitor import GpuReadings, HostReadings, decode_reasons

CUDA = torch.device("cuda", 0)


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_metrics_log_steady_rate_leaves_out_warm_up_exclusions_and_probes(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(checkpoints.time, "time", clock)
    calls = []

    def probe(steps):                    # a reading that takes 0.5 s
        calls.append(steps)
        clock.t += 0.5
        return {"probe_steps": steps}

    log = checkpoints.MetricsLog(tmp_path / "m.jsonl", 0, 8, rate_name="images_per_s", probes=[probe])
    clock.t += 4.0                                           # steps 1-10, warm-up (first interval)
    r1 = log.record(10, {"loss": 1.0}, steady=False)
    assert list(r1) == ["step", "loss", "images_per_s", "elapsed_s", "train_images_per_s", "probe_steps"]
    assert r1["images_per_s"] == pytest.approx(80 / 4.0) and r1["train_images_per_s"] is None
    clock.t += 2.0                                           # steps 11-20: 2 s of training ...
    with log.exclude():
        clock.t += 3.0                                       # ... and a 3 s checkpoint write
    r2 = log.record(20, {"loss": 0.5}, steady=True)
    # wall: 0.5 s probe + 2 s + 3 s; training: 2 s
    assert r2["images_per_s"] == pytest.approx(80 / 5.5) and r2["train_images_per_s"] == pytest.approx(40.0)
    clock.t += 1.0                                           # steps 21-30: 1 s (+ the 0.5 s probe of r2)
    r3 = log.record(30, {"loss": 0.4}, steady=True)
    assert r3["train_images_per_s"] == pytest.approx(80.0) and r3["elapsed_s"] == pytest.approx(11.0)
    assert calls == [10, 10, 10]
    assert log.steady_rate == pytest.approx(160 / 3.0)       # pairs of steady intervals / their training seconds
    synced = []
    with log.exclude(sync=lambda: synced.append(clock.t)):
        pass
    assert synced == [clock.t]
    # without ``steady`` a record is as before (2-D trainer)
    r4 = log.record(40, {"loss": 0.3})
    assert "train_images_per_s" not in r4 and r4["probe_steps"] == 10
    log.close()


def test_metrics_log_steady_rate_is_none_before_a_steady_interval(tmp_path):
    log = checkpoints.MetricsLog(tmp_path / "m.jsonl", 0, 4, write=False)
    log.record(1, {}, steady=False)
    assert log.steady_rate is None


class FakeSmi:
    """nvidia-smi answers: the GPU query (rejecting the field names in ``unknown``) and the process list."""

    def __init__(self, gpu_line: str, apps: str = "", unknown=(), absent=()):
        self.gpu_line, self.apps, self.unknown, self.calls = gpu_line, apps, set(unknown), []
        self.absent = set(absent)          # -i values it does not know

    def __call__(self, cmd, capture_output, text, timeout):
        assert capture_output and text and timeout == monitor.TIMEOUT_S
        self.calls.append(cmd)
        query = cmd[1]
        if cmd[-1] in self.absent:
            return subprocess.CompletedProcess(cmd, 6, "", "No devices were found")
        bad = [f for f in self.unknown if f in query]
        if bad:
            return subprocess.CompletedProcess(cmd, 2, "", f'Field "{bad[0]}" is not a valid field to query.')
        out = self.gpu_line if query.startswith("--query-gpu=") else self.apps
        return subprocess.CompletedProcess(cmd, 0, out, "")


def test_gpu_readings_parse_clocks_power_reasons_and_processes():
    smi = FakeSmi("1755, 1980, 2619, 61, 512.34, 700.00, 98, 12034, 0x0000000000000024\n", "4242\n4343\n")
    g = GpuReadings(CUDA, runner=smi, exe="/x/nvidia-smi", selector="GPU-abc")
    rec = g.read()
    assert rec == {"gpu_sm_mhz": 1755.0, "gpu_sm_max_mhz": 1980.0, "gpu_mem_mhz": 2619.0, "gpu_temp_c": 61.0,
                   "gpu_power_w": 512.34, "gpu_power_limit_w": 700.0, "gpu_util_pct": 98.0,
                   "gpu_mem_used_mib": 12034.0, "gpu_clock_reasons": ["sw_power_cap", "sw_thermal"],
                   "gpu_processes": 2, "gpu_mem_own_mib": None}      # no CUDA context in this process
    gpu_cmd, apps_cmd = smi.calls
    assert gpu_cmd[0] == "/x/nvidia-smi" and gpu_cmd[-2:] == ["-i", "GPU-abc"]
    assert gpu_cmd[1] == ("--query-gpu=clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit,"
                          "utilization.gpu,memory.used,clocks_event_reasons.active")
    assert apps_cmd[1:] == ["--query-compute-apps=pid", "--format=csv,noheader", "-i", "GPU-abc"]


def test_gpu_readings_fall_back_to_the_older_reason_field_then_to_none():
    smi = FakeSmi("1410, 1980, 2619, 80, [N/A], 700.00, 100, 900, 0x0000000000000001", unknown=["clocks_event"])
    rec = GpuReadings(CUDA, runner=smi, exe="smi", selector="0").read()
    assert rec["gpu_power_w"] is None and rec["gpu_clock_reasons"] == ["idle"] and rec["gpu_processes"] == 0
    assert "clocks_throttle_reasons.active" in smi.calls[1][1]
    smi = FakeSmi("1410, 1980, 2619, 80, 300, 700.00, 100, 900", unknown=["clocks_event", "clocks_throttle"])
    g = GpuReadings(CUDA, runner=smi, exe="smi", selector="0")
    rec = g.read()
    assert rec["gpu_sm_mhz"] == 1410.0 and "gpu_clock_reasons" not in rec
    n = len(smi.calls)
    g.read()
    assert len(smi.calls) == n + 2          # the working query is remembered: one GPU query + one process list


def test_gpu_readings_fail_soft_once_with_a_note(caplog):
    def broken(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])
    g = GpuReadings(CUDA, runner=broken, exe="smi", selector="0")
    with caplog.at_level(logging.WARNING, logger="kdm.monitor"):
        first = g.read()
    assert list(first) == ["gpu_note"]
    assert first["gpu_note"].startswith("GPU readings unavailable: TimeoutExpired: Command '['smi', '--query-gpu=")
    assert first["gpu_note"].endswith("timed out after 10.0 seconds")
    assert any("GPU readings unavailable" in r.message for r in caplog.records)
    assert g.read() == {} and g.read() == {}                   # the note once, then nothing, no more queries


def test_gpu_readings_without_nvidia_smi_and_off_cuda(monkeypatch, caplog):
    monkeypatch.setattr(monitor.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="kdm.monitor"):
        g = GpuReadings(CUDA)
    assert g.read() == {"gpu_note": "GPU readings unavailable: nvidia-smi is not on PATH"}
    assert g.read() == {}
    called = []
    cpu = GpuReadings(torch.device("cpu"), runner=lambda *a, **k: called.append(a))
    assert cpu.read() == {} and cpu.note is None and not called
    assert [p.__self__.__class__ for p in monitor.interval_probes(torch.device("cpu"))] == [HostReadings]


def test_decode_reasons_and_host_readings(monkeypatch):
    assert decode_reasons("0x0000000000000000") == []
    assert decode_reasons("0x0000000000000044") == ["sw_power_cap", "hw_thermal"]
    assert decode_reasons("0x1000") == ["0x1000"] and decode_reasons("[N/A]") is None
    cpu, wall = Clock(10.0), Clock(100.0)
    monkeypatch.setattr(monitor.time, "process_time", cpu)
    monkeypatch.setattr(monitor.time, "perf_counter", wall)
    monkeypatch.setattr(monitor.os, "getloadavg", lambda: (3.25, 2.0, 1.0))
    h = HostReadings()
    cpu.t, wall.t = 13.0, 102.0                              # 3 CPU seconds in 2 wall seconds, 100 steps
    assert h.read(100) == {"host_cpu_ms_per_step": 30.0, "host_cpu_cores": 1.5, "load_avg_1m": 3.25}
    cpu.t, wall.t = 13.5, 103.0
    assert h.read(10)["host_cpu_ms_per_step"] == 50.0


def test_gpu_readings_try_the_index_when_the_uuid_is_unknown(monkeypatch):
    monkeypatch.setattr(monitor, "gpu_selectors", lambda device: ["GPU-bad", "3"])
    smi = FakeSmi("1980, 1980, 2619, 40, 100, 700, 5, 800, 0x0", "1\n", absent=["GPU-bad"])
    g = GpuReadings(CUDA, runner=smi, exe="smi")
    assert g.read()["gpu_clock_reasons"] == [] and g._selector == "3"
    # the unknown UUID cost three tries (both reason field names, then none) and left the field list alone
    assert [c[-1] for c in smi.calls] == ["GPU-bad"] * 3 + ["3", "3"]
    assert "clocks_event_reasons.active" in smi.calls[3][1]
    smi.calls.clear()
    g.read()
    assert [c[-1] for c in smi.calls] == ["3", "3"]


def test_uuid_selector_from_torch_properties():
    class Raw:
        bytes = bytes(range(16))
    assert monitor.uuid_selector(Raw()) == "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f"
    assert monitor.uuid_selector("58F0F7D4-1c2b-4e3f-9a8b-7c6d5e4f3a2b") == "GPU-58f0f7d4-1c2b-4e3f-9a8b-7c6d5e4f3a2b"
    assert monitor.uuid_selector("no uuid here") is None and monitor.uuid_selector(None) is None
