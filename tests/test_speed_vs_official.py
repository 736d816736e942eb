"""bench/speed_vs_official.py: the summaries of its parts (values) and its CPU path end to end (JSON keys,
ratios recomputed from the parts' own results, parts that need CUDA recorded as skipped)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from image_fixtures import image_folder, write_archive

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import speed_vs_official as svo  # noqa: E402

sys.path.pop(0)

OFFICIAL = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "cudnn_allow_tf32": True,
            "matmul_allow_tf32": False, "official_step_s_b128_LPIPS": 0.3398, "official_peak_GiB_LPIPS": 20.5,
            "official_step_s_b128_Huber": 0.3735, "official_peak_GiB_Huber": 19.25,
            "official_sample_img_per_s_b1000": 4203.0}


def engine_result(ms: dict, key="engine_bf16_nchw_cuda_graphs") -> dict:
    steps = {}
    for obj, v in ms.items():
        name = key if obj == "pseudo-huber+D" else f"{key}@{obj}"
        steps[name] = {"step_s": v / 1e3, "peak_mem_gib": 12.0, "pairs_per_s": 128e3 / v,
                       "profile": {"gpu_ms_per_call": v - 2.0, "gpu_idle_ms_per_step": 2.0, "launches_per_call": 900,
                                   "ms_by_class": {"conv_gemm": 40.0, "norm": 20.0}}}
    return {"info": {"batch": 128}, "train_step": steps}


def test_comparison_with_the_official_step_per_family():
    rows = svo.engine_rows(engine_result({"pseudo-huber+D": 93.0, "pseudo-huber": 80.0, "lpips-own+D": 100.0,
                                          "lpips-own": 84.9}), "engine_bf16_nchw_cuda_graphs")
    assert rows["lpips-own"]["kernels_per_step"] == 900 and rows["lpips-own"]["gpu_idle_ms_per_step"] == 2.0
    c = svo.compare(OFFICIAL, rows)
    assert list(c) == ["pseudo-huber+D", "pseudo-huber", "lpips-own+D", "lpips-own"]
    assert c["pseudo-huber+D"]["official"] == "Huber + D" and c["pseudo-huber+D"]["family"] == "Huber"
    assert c["pseudo-huber+D"]["speedup"] == pytest.approx(373.5 / 93.0) and c["pseudo-huber+D"]["met"]
    assert c["lpips-own+D"]["official"] == "LPIPS + D" and c["lpips-own+D"]["family"] == "perceptual"
    assert c["lpips-own+D"]["speedup"] == pytest.approx(3.398) and not c["lpips-own+D"]["met"]
    assert c["lpips-own"]["speedup"] == pytest.approx(339.8 / 84.9) and c["lpips-own"]["met"]
    assert c["lpips-own"]["official_peak_gib"] == 20.5 and c["lpips-own"]["engine_peak_gib"] == 12.0
    md = svo.markdown({"date": "2026-12-08T10:00:00", "gpu": "NVIDIA H100 80GB HBM3", "device": "cuda",
                       "torch": "2.11.0+cu130", "official": OFFICIAL, "comparison": c,
                       "engine": {"preset_path": {"variant": "graphs-nchw", "rows": rows}},
                       "parts": {"pairs": {"status": "skipped", "note": "budget: 100 s left, about 150 s needed"}}})
    assert "| Huber | Huber + D | 373.5 | 19.25 | pseudo-huber+D | 93.0 | 12.00 | **4.02x** |" in md
    assert "| perceptual | LPIPS + D | 339.8 | 20.50 | lpips-own | 84.9 | 12.00 | **4.00x** |" in md
    assert "| lpips-own (graphs-nchw) | 84.9 | 82.9 | 2.0 | 900 | conv_gemm 40.0, norm 20.0 |" in md
    assert md.rstrip().endswith("Not measured in this call: pairs (skipped: budget: 100 s left, about 150 s needed).")


def test_mini_summary_and_pairs_and_sampling_goals():
    bench = {"info": {"batch": 256}, "train_step": {"engine_bf16_nchw_cuda_graphs@lpips-own":
                                                    {"step_s": 0.128, "pairs_per_s": 2000.0, "peak_mem_gib": 5.0}}}
    stage = {"rows": {"preset": {"steady_pairs_per_s": 1850.0, "pairs_per_s": 1700.0}}}
    m = svo.mini_summary(bench, stage, "engine_bf16_nchw_cuda_graphs", "preset")
    assert m["stage_over_bench"] == pytest.approx(0.925) and m["met"] and m["batch"] == 256
    stage["rows"]["preset"]["steady_pairs_per_s"] = 1700.0
    assert not svo.mini_summary(bench, stage, "engine_bf16_nchw_cuda_graphs", "preset")["met"]
    p = svo.pairs_summary({"throughput": {"reference": {"pairs_per_s": 78.5}, "fp16-compile": {"pairs_per_s": 251.1}},
                           "drift": {"teacher": "/t", "fp16-compile": {"mean_abs": 1e-4, "max_abs": 1.4e-3}}})
    assert p["speedup"] == pytest.approx(3.199, abs=1e-3) and not p["met"]
    assert (p["drift_mean"], p["drift_max"], p["drift_teacher"]) == (1e-4, 1.4e-3, "/t")
    s = svo.sampling_summary({"sampling": {"bf16-sdpa-compile": {"images_per_s": 15099.0, "batch": 1000}}}, OFFICIAL)
    assert s == {"engine_images_per_s": 15099.0, "batch": 1000, "official_images_per_s": 4203.0, "goal": 15000,
                 "met": True}


def rec(step, rate, **kw):
    return {"step": step, "train_images_per_s": rate, **kw}


def test_teacher_summary_names_what_came_with_a_slowdown():
    B = 256
    warm = rec(100, None)
    steady = [rec(200, 21 * B, gpu_sm_mhz=1980, host_cpu_ms_per_step=20.0), rec(300, 20.5 * B, gpu_sm_mhz=1980,
                                                                                  host_cpu_ms_per_step=20.0)]
    s = svo.teacher_summary([warm, *steady], B)
    assert s["steady_intervals"] == 2 and s["steps_per_s"] == [21.0, 20.5]
    assert s["verdict"] == "no slowdown: the last steady interval ran at 0.98 of the first's rate"
    clock = [warm, rec(200, 21 * B, gpu_sm_mhz=1980, gpu_clock_reasons=[], gpu_processes=1),
             rec(1200, 12 * B, gpu_sm_mhz=1125, gpu_clock_reasons=["sw_power_cap"], gpu_processes=1, gpu_temp_c=84)]
    s = svo.teacher_summary(clock, B)
    assert s["last_over_first"] == pytest.approx(12 / 21) and s["gpu_sm_mhz_range"] == [1125, 1980]
    assert s["verdict"] == ("slowed to 0.57 of the first steady interval's rate; with it: GPU clock (SM 1980 -> 1125 "
                            "MHz, reasons sw_power_cap)")
    shared = [rec(200, 21 * B, gpu_processes=1, gpu_mem_used_mib=9000, gpu_mem_own_mib=8000),
              rec(300, 12 * B, gpu_processes=2, gpu_mem_used_mib=30000, gpu_mem_own_mib=8000)]
    s = svo.teacher_summary(shared, B)
    assert s["gpu_foreign_mem_mib_max"] == 22000 and "another process on the GPU" in s["verdict"]
    host = [rec(200, 21 * B, host_cpu_ms_per_step=40.0), rec(300, 12 * B, host_cpu_ms_per_step=70.0)]
    assert svo.teacher_summary(host, B)["verdict"].endswith("host CPU time per step (40.0 -> 70.0 ms)")
    none = [rec(200, 21 * B), rec(300, 12 * B, gpu_note="GPU readings unavailable: nvidia-smi is not on PATH")]
    s = svo.teacher_summary(none, B)
    assert s["verdict"].endswith("(unexplained by these readings)") and s["gpu_note"].endswith("not on PATH")
    assert svo.teacher_summary([warm, steady[0]], B)["verdict"] == "too few steady intervals to compare"


@pytest.mark.slow
def test_cpu_path_writes_the_json_and_the_table(tmp_path):
    members, _ = image_folder(np.random.default_rng(0), per_class={"train": 6, "test": 1})
    archive = write_archive(tmp_path / "a.tgz", members)
    official = tmp_path / "official.json"
    official.write_text(json.dumps(OFFICIAL))
    out = tmp_path / "out"
    rec = svo.main(["--device", "cpu", "--tiny", "--official-json", str(official), "--archive", str(archive),
                    "--out-dir", str(out), "--keep-logs"])
    saved = json.loads((out / "speed-vs-official.json").read_text())
    assert saved["kind"] == "speed-vs-official" and saved["device"] == "cpu" and saved["tiny"] is True
    assert saved["parts"] == json.loads(json.dumps(rec["parts"]))
    status = {k: v["status"] for k, v in saved["parts"].items()}
    assert status == {"official": "ok", "engine": "ok", "mini": "ok", "teacher": "ok", "pairs": "skipped",
                      "sampling": "skipped"}, saved["parts"]
    assert saved["parts"]["pairs"]["note"].startswith("needs CUDA")
    # the engine ran the four objectives of the presets' path (fp32 NCHW on the CPU) with the right settings
    steps = saved["engine_raw"]["train_step"]
    names = ["engine_fp32_tf32_nchw", "engine_fp32_tf32_nchw@pseudo-huber", "engine_fp32_tf32_nchw@lpips-own",
             "engine_fp32_tf32_nchw@lpips-own+D"]
    assert sorted(steps) == sorted(names)
    assert [(steps[n]["settings"]["distance"], steps[n]["settings"]["adv_weight"]) for n in names] == \
        [("pseudo-huber", 0.01), ("pseudo-huber", 0.0), ("lpips-own", 0.0), ("lpips-own", 0.01)]
    assert all(not steps[n]["settings"]["channels_last"] and steps[n]["settings"]["precision"] == "fp32" for n in names)
    c = saved["comparison"]
    assert set(c) == {"pseudo-huber+D", "pseudo-huber", "lpips-own+D", "lpips-own"}
    for obj, name in zip(("pseudo-huber+D", "pseudo-huber", "lpips-own", "lpips-own+D"), names):
        off = 1e3 * OFFICIAL[f"official_step_s_b128_{'Huber' if obj.startswith('pseudo') else 'LPIPS'}"]
        assert c[obj]["official_ms_per_step"] == pytest.approx(off)
        assert c[obj]["speedup"] == pytest.approx(off / (1e3 * steps[name]["step_s"]))
    m = saved["mini"]
    assert m["bench_result"] == "engine_fp32_tf32_nchw@lpips-own" and m["stage_row"] == "fp32" and m["batch"] == 2
    assert m["stage_over_bench"] == pytest.approx(m["stage_steady_pairs_per_s"] / m["bench_pairs_per_s"])
    t = saved["teacher"]
    assert (t["steps"], t["intervals"], t["steady_intervals"], t["batch"]) == (6, 3, 2, 8)
    assert t["verdict"].startswith(("no slowdown", "slowed to")) and t["gpu_sm_mhz_range"] is None
    recs = saved["teacher_records"]
    assert [r["step"] for r in recs] == [2, 4, 6] and recs[0]["train_images_per_s"] is None
    assert all(r["host_cpu_ms_per_step"] > 0 for r in recs)
    md = (out / "speed-vs-official.md").read_text()
    assert md.startswith("### Official code as it runs (`bench/speed_vs_official.py`, cpu, ")
    assert f"| Huber | Huber + D | 373.5 | 19.25 | pseudo-huber+D | {1e3 * steps[names[0]]['step_s']:.1f} |" in md
    assert "Not measured in this call: pairs (skipped: needs CUDA" in md
    logs = (out / "speed-vs-official-parts.log").read_text()
    assert [ln for ln in logs.splitlines() if ln.startswith("===== ")] == ["===== engine", "===== mini", "===== teacher"]
    assert sorted(p.name for p in out.iterdir()) == ["speed-vs-official-parts.log", "speed-vs-official.json",
                                                      "speed-vs-official.md"]


def test_a_teacher_part_cut_off_keeps_the_intervals_it_logged(tmp_path, monkeypatch):
    import argparse
    archive = tmp_path / "a.tgz"
    archive.write_bytes(b"")
    a = argparse.Namespace(device="cpu", tiny=True, parts=["teacher"], budget_s=100.0, official_dir="",
                           official_json=None, archive=str(archive), steps=1, mini_steps=4, keep_logs=False,
                           out_dir=str(tmp_path / "out"))
    d = svo.Driver(a)
    logged = [{"step": 2, "images_per_s": 50.0, "train_images_per_s": None},
              {"step": 4, "images_per_s": 80.0, "train_images_per_s": 96.0},
              {"step": 6, "images_per_s": 40.0, "train_images_per_s": 48.0}]

    def killed(name, cmd, env=None, cwd=None):     # the run is killed after its third record
        work = d.tmp / "teacher" / "teacher.partial"
        work.mkdir(parents=True)
        (work / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logged) + '{"step": 8, "lo')
        return "timed out after 95 s"
    monkeypatch.setattr(d, "run", killed)
    rec = d.main()
    assert rec["parts"]["teacher"]["status"] == "failed" and rec["parts"]["teacher"]["note"] == "timed out after 95 s"
    t = rec["teacher"]
    assert t["cut_off_at_step"] == 6 and t["steady_intervals"] == 2 and t["steps_per_s"] == [12.0, 6.0]
    assert t["verdict"].startswith("slowed to 0.50 of the first steady interval's rate")
    assert rec["teacher_records"] == logged
    saved = json.loads((tmp_path / "out" / "speed-vs-official.json").read_text())
    assert saved["teacher"] == t and list(saved["parts"]) == ["teacher"]
