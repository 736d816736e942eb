"""Image training engine: learning, bitwise resume, non-finite guard, EMA output, device errors, benchmark smoke."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.errors import KDMError
from pipeline.training.image_data import write_synthetic_store
from pipeline.training.image_train import ImageTrainer, read_image_student_manifest, train_image_student
from storage_schemas.kdm_image import ImageTrainConfig, KDMImageConfig, SongUNetConfig

REPO = Path(__file__).resolve().parents[1]
TINY = SongUNetConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.1)
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def model_cfg(res=16, **kw) -> KDMImageConfig:
    base = dict(img_resolution=res, unet=TINY, distance="pseudo-huber", adv_weight=0.0)
    base.update(kw)
    return KDMImageConfig(**base)


def train_cfg(**kw) -> ImageTrainConfig:
    base = dict(device="cpu", precision="fp32", batch_size=4, threads=1, log_every=1, checkpoint_every=3)
    base.update(kw)
    return ImageTrainConfig(**base)


def batch(n=4, res=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 80 * torch.randn(n, 3, res, res, generator=g), torch.rand(n, 3, res, res, generator=g) * 2 - 1


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_loss_decreases_on_a_tiny_overfit_problem():
    unet = TINY.model_copy(update={"dropout": 0.0})
    tr = ImageTrainer(model_cfg(unet=unet, distance="mse"), train_cfg(lr=2e-3), CPU)
    xT, _ = batch()
    g = torch.linspace(-1, 1, 16)
    pattern = 0.8 * torch.sin(3 * g)[:, None] * torch.cos(2 * g)[None, :]
    x0 = pattern.expand(4, 3, 16, 16).clone()            # one smooth target image
    losses = []
    for _ in range(10):
        assert tr.train_step(xT, x0)
        losses.append(tr.pop_metrics()["total"])
    assert losses[-1] < 0.6 * losses[0], losses
    assert tr.nonfinite_steps == 0


def test_the_step_runs_the_models_training_pass():
    """The engine has no copy of the pass: its forward module is the model, and a step's losses are the
    model's forward with the engine's noise draws (bitwise, in fp32 on the CPU)."""
    import copy
    import torch.nn.functional as F
    unet = TINY.model_copy(update={"dropout": 0.0})
    mc = model_cfg(unet=unet, distance="mse", label_dim=3, operator="factorized", spectral_loss="inverse",
                   latent_proj_dim=16)
    tr = ImageTrainer(mc, train_cfg(), CPU)
    assert tr.forward_module is tr.model
    model, gen = copy.deepcopy(tr.model), torch.Generator().set_state(tr.noise_gen.get_state())
    xT, x0 = batch()
    labels = torch.tensor([0, 1, 2, 1])
    assert tr.train_step(xT, x0, labels)
    eps = torch.randn((2, 4, model.latent_dim), generator=gen)
    out = model(x0, xT, labels, eps0=eps[0], epsT=eps[1], spectral="inverse")
    want = {"rec": F.mse_loss(out.x0_rec, x0), "lat": F.mse_loss(out.z_push, out.z0),
            "pred": F.mse_loss(out.x0_push, x0), "spectral": out.spectral}
    got = tr.pop_metrics()
    for k, v in want.items():
        assert got[k] == v.item(), k


def test_bf16_step_conditional_and_kdm_f():
    cfg = model_cfg(label_dim=3, operator="factorized", spectral_loss="unit-disk-uniform", latent_proj_dim=16)
    tr = ImageTrainer(cfg, train_cfg(precision="bf16", channels_last=True), CPU)
    xT, x0 = batch()
    assert tr.train_step(xT, x0, torch.tensor([0, 1, 2, 0]))
    m = tr.pop_metrics()
    assert {"rec", "lat", "pred", "spectral", "total", "grad_norm"} <= set(m)
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values())
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())          # fp32 master weights
    with pytest.raises(KDMError, match="labels"):
        tr.train_step(xT, x0, None)


def test_nonfinite_guard_skips_and_counts():
    tr = ImageTrainer(model_cfg(res=32, adv_weight=0.01, latent_proj_dim=16), train_cfg(), CPU)
    xT, x0 = batch(res=32)
    assert tr.train_step(xT, x0)
    tr.pop_metrics()
    before = {n: snapshot(m) for n, m in (("model", tr.model), ("ema", tr.ema), ("disc", tr.disc))}
    bad = x0.clone()
    bad[1, 0, 3, 3] = float("inf")
    assert tr.train_step(xT, bad) is False
    assert tr.nonfinite_steps == 1
    for name, m in (("model", tr.model), ("ema", tr.ema), ("disc", tr.disc)):
        after = snapshot(m)
        assert all(torch.equal(after[k], before[name][k]) for k in after), f"{name} changed on a skipped step"
    assert tr.pop_metrics() == {}                       # skipped steps are not averaged into the metrics
    xT_bad = xT.clone()
    xT_bad[0] = float("nan")
    assert tr.train_step(xT_bad, x0) is False and tr.nonfinite_steps == 2
    assert tr.train_step(xT, x0) is True and tr.nonfinite_steps == 2


@pytest.mark.parametrize("sanitize", [True, False])
def test_nonfinite_gradients_of_a_finite_loss_are_sanitised_or_skip_the_step(sanitize):
    """Official behaviour (sanitize_grads): NaN gradients become 0 and the step goes on; otherwise the
    generator step and the EMA are skipped and counted (the loss itself is finite here)."""
    tr = ImageTrainer(model_cfg(distance="mse"), train_cfg(sanitize_grads=sanitize), CPU)
    xT, x0 = batch()
    poisoned = tr.params[0]
    poisoned.register_hook(lambda g: torch.full_like(g, float("nan")))
    before, ema_before = snapshot(tr.model), snapshot(tr.ema)
    assert tr.train_step(xT, x0) is sanitize
    assert tr.nonfinite_steps == (0 if sanitize else 1)
    after, ema_after = snapshot(tr.model), snapshot(tr.ema)
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    if sanitize:
        assert changed and all(torch.isfinite(v).all() for v in after.values())
        assert set(tr.pop_metrics()) >= {"total", "grad_norm"}
        assert any(not torch.equal(ema_after[k], ema_before[k]) for k in ema_after)
    else:
        assert changed == [] and all(torch.equal(ema_after[k], ema_before[k]) for k in ema_after)
        assert tr.pop_metrics() == {}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_synthetic_store(str(tmp_path_factory.mktemp("pairs") / "p"), 40, (3, 32, 32), chunk_size=16,
                                 seed=1).url


RUN_MODEL = dict(res=32, adv_weight=0.01, latent_proj_dim=16)


def run_cfgs(**kw):
    return model_cfg(**RUN_MODEL), train_cfg(steps=7, buffer_chunks=2, **kw)


def ckpt_files(run: Path, step: int) -> dict[str, bytes]:
    d = run / "checkpoints" / f"step-{step:08d}"
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_resume_is_bitwise_equal_and_saves_the_ema(pairs, tmp_path):
    mc, tc = run_cfgs()
    a, b = tmp_path / "a", tmp_path / "b"
    logs = []
    va = train_image_student(pairs, mc, tc, str(a), progress=False, on_log=logs.append)
    assert [r["step"] for r in logs] == list(range(1, 8)) and all(r["nonfinite_steps"] == 0 for r in logs)

    seen = []
    vb = train_image_student(pairs, mc, tc, str(b), progress=False, max_steps=4,   # "killed" after step 4
                             on_checkpoint=lambda step, ema: seen.append((step, ema.training, ema.xT_encoder)))
    assert va == vb
    assert [s for s, _, _ in seen] == [3, 4] and not any(t for _, t, _ in seen)   # the EMA model, eval mode
    assert not (b / "manifest.json").exists() and (b / "checkpoints" / "step-00000004").is_dir()
    state = json.loads((b / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["step"] == 4 and state["data"]["cursor"] == {"epoch": 0, "offset": 16}
    assert train_image_student(pairs, mc, tc, str(b), progress=False) == va

    assert (a / "student.safetensors").read_bytes() == (b / "student.safetensors").read_bytes()
    fa, fb = ckpt_files(a, 7), ckpt_files(b, 7)
    assert sorted(fa) == sorted(fb) == ["disc.safetensors", "disc_optimizer.pt", "ema.safetensors",
                                        "model.safetensors", "optimizer.pt", "rng.pt", "state.json"]
    for name in fa:
        assert fa[name] == fb[name], f"{name} differs after resume"
    ma = [json.loads(ln) for ln in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(ln) for ln in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in mb] == list(range(1, 8))
    assert [r["loss_total"] for r in ma] == [r["loss_total"] for r in mb]

    # the final weights are the EMA weights, not the raw ones
    student = load_file(str(a / "student.safetensors"))
    ema = load_file(str(a / "checkpoints" / "step-00000007" / "ema.safetensors"))
    raw = load_file(str(a / "checkpoints" / "step-00000007" / "model.safetensors"))
    assert student.keys() == ema.keys() == raw.keys()
    assert all(torch.equal(student[k], ema[k]) for k in student)
    assert any(not torch.equal(student[k], raw[k]) for k in student)
    m = read_image_student_manifest(str(a))
    assert m.weights_are_ema and m.steps_done == 7 and m.nonfinite_steps == 0 and m.version == va
    assert m.discriminator_parameters > 0 and set(m.final_losses) >= {"rec", "lat", "pred", "adv", "disc", "total"}
    # a finished run is found, not retrained
    assert train_image_student(pairs, mc, tc, str(a), progress=False) == va


def test_logged_throughput_leaves_out_warm_up_and_checkpoint_writes(pairs, tmp_path, monkeypatch):
    """Each record's train_pairs_per_s counts only the interval's steps: the first interval (cuDNN autotuning,
    compilation or the CUDA-graph capture fall there) has none, and the time of a checkpoint write is left
    out; the manifest's steady_pairs_per_s is the pairs of the steady intervals over their training seconds."""
    from pipeline.training import image_train
    save = image_train._save_checkpoint
    pause = 0.4

    def slow_save(*args, **kw):        # a checkpoint write that takes at least `pause` seconds
        time.sleep(pause)
        save(*args, **kw)
    monkeypatch.setattr(image_train, "_save_checkpoint", slow_save)
    mc = model_cfg(**{**RUN_MODEL, "adv_weight": 0.0})
    tc = train_cfg(steps=5, log_every=1, checkpoint_every=2, buffer_chunks=2)
    logs = []
    train_image_student(pairs, mc, tc, str(tmp_path / "r"), progress=False, on_log=logs.append)
    assert [r["step"] for r in logs] == [1, 2, 3, 4, 5]
    assert logs[0]["train_pairs_per_s"] is None                         # warm-up interval
    rates = [r["train_pairs_per_s"] for r in logs[1:]]
    assert all(r > 0 for r in rates)
    # the intervals after the checkpoints of steps 2 and 4 hold the write: their wall rate is lower by it
    for r in (logs[2], logs[4]):
        wall_s, train_s = tc.batch_size / r["pairs_per_s"], tc.batch_size / r["train_pairs_per_s"]
        assert wall_s - train_s >= pause - 0.01, r
    r = logs[1]                          # no checkpoint in it: only the logging itself is left out
    assert 0 <= tc.batch_size / r["pairs_per_s"] - tc.batch_size / r["train_pairs_per_s"] < pause / 2
    m = read_image_student_manifest(str(tmp_path / "r"))
    steady = 4 * tc.batch_size / sum(tc.batch_size / r for r in rates)
    assert m.steady_pairs_per_s == pytest.approx(steady, abs=0.051)
    # host readings with every record; no GPU fields on the CPU
    assert all(r["host_cpu_ms_per_step"] > 0 and "load_avg_1m" in r for r in logs)
    assert not any(k.startswith("gpu_") for r in logs for k in r)
    saved = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_pairs_per_s"] for r in saved] == [r["train_pairs_per_s"] for r in logs]


@pytest.mark.gpu
def test_requesting_cuda_without_a_gpu_is_an_error(pairs, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    mc, tc = run_cfgs()
    with pytest.raises(KDMError, match="CUDA"):
        train_image_student(pairs, mc, tc, str(tmp_path / "run"), device="cuda", progress=False)
    with pytest.raises(KDMError, match="CUDA"):
        train_image_student(pairs, mc, tc.model_copy(update={"device": "cuda"}), str(tmp_path / "run"),
                            progress=False)
    assert not (tmp_path / "run").exists()


def test_store_mismatch_errors(pairs, tmp_path):
    mc, tc = run_cfgs()
    with pytest.raises(KDMError, match="sample shape"):
        train_image_student(pairs, model_cfg(res=16), tc, str(tmp_path / "r1"), progress=False)
    with pytest.raises(KDMError, match="noise_scale"):
        train_image_student(pairs, mc.model_copy(update={"noise_scale": 1.0}), tc, str(tmp_path / "r2"),
                            progress=False)
    with pytest.raises(KDMError, match="conditional"):
        train_image_student(pairs, model_cfg(**RUN_MODEL, label_dim=10), tc, str(tmp_path / "r3"), progress=False)


def test_benchmark_smoke_on_cpu(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_kdm_image
    finally:
        sys.path.pop(0)
    out = tmp_path / "bench.json"
    res = bench_kdm_image.main(["--device", "cpu", "--tiny", "--steps", "1", "--warmup", "1", "--batch", "2",
                                "--sample-batch", "2", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["info"]["gpu"] is None and saved["info"]["date"]
    steps = saved["train_step"]
    assert {"reference_fp32_eager", "engine_bf16", "engine_fp32_tf32"} <= set(steps)
    assert all("step_s" in r for r in steps.values()), steps
    assert set(saved["speedup_vs_reference"]) == {"engine_bf16", "engine_bf16_nchw", "engine_fp32_tf32"}
    assert saved["sampling"]["bf16"]["images_per_s"] > 0 and saved["sampling"]["fp32"]["images_per_s"] > 0
    assert res["info"] == saved["info"]


def test_reference_step_matches_the_engine_in_fp32():
    """The engine's fused forward (one decoder pass) computes the official losses."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_kdm_image
    finally:
        sys.path.pop(0)
    unet = TINY.model_copy(update={"dropout": 0.0})
    mc = model_cfg(res=32, adv_weight=0.01, latent_proj_dim=16, unet=unet, latent_noise=0.0)
    tc = train_cfg(channels_last=False, sanitize_grads=True)
    tr = ImageTrainer(mc, tc, CPU)
    ref = bench_kdm_image.ReferenceState(mc, tc, CPU, seed=tc.seed)
    assert all(torch.equal(a, b) for a, b in zip(tr.model.state_dict().values(), ref.model.state_dict().values()))
    ref.disc.load_state_dict(tr.disc.state_dict())
    xT, x0 = batch(res=32)
    tr.train_step(xT, x0)
    out = bench_kdm_image.reference_step(ref, x0, xT)
    assert torch.allclose(torch.tensor(tr.pop_metrics()["total"]), out["total"], rtol=1e-5)
    for a, b in zip(tr.model.parameters(), ref.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_image_engine import RUN_MODEL, model_cfg, train_cfg
from pipeline.training.image_train import train_image_student
max_steps = int(sys.argv[3]) if len(sys.argv) > 3 else None
train_image_student(sys.argv[2], model_cfg(**RUN_MODEL), train_cfg(steps=4, batch_size=8, buffer_chunks=2),
                    sys.argv[1], progress=False, max_steps=max_steps)
"""


@pytest.mark.slow
def test_two_process_ddp_on_cpu_resumes_bitwise(pairs, tmp_path):
    """torchrun with 2 CPU processes (gloo): rank 0 writes; an interrupted 2-process run ends equal."""
    import os
    import subprocess
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(REPO / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(out), pairs, *extra]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]

    torchrun(tmp_path / "a")
    torchrun(tmp_path / "b", "2")
    torchrun(tmp_path / "b")
    m = read_image_student_manifest(str(tmp_path / "a"))
    assert m.world_size == 2 and m.steps_done == 4
    assert (tmp_path / "a" / "student.safetensors").read_bytes() == (tmp_path / "b" / "student.safetensors").read_bytes()


def test_cuda_graphs_config_errors_are_precise():
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="needs device='cuda'"):
        ImageTrainConfig(device="cpu", cuda_graphs=True)
    # compile inside the captured step is an opt-in combination (the compiled U-Nets are captured with the rest)
    both = ImageTrainConfig(cuda_graphs=True, compile=True)
    assert (both.cuda_graphs, both.compile) == (True, True)
    assert ImageTrainConfig(compile=True).cuda_graphs is None


def test_cuda_graphs_default_to_one_eager_cpu_process():
    tr = ImageTrainer(model_cfg(), train_cfg(), CPU)
    assert train_cfg().cuda_graphs is None and tr.cuda_graphs is False
    assert ImageTrainer(model_cfg(), train_cfg(cuda_graphs=False), CPU).cuda_graphs is False
    # a multi-step student's captured step is opt-in: torchrun is the one refusal
    multi = ImageTrainer(model_cfg(nfe_train=[1, 2]), train_cfg(), CPU, intervals=4)
    assert multi.multi and multi.cuda_graphs is False
    from pipeline.training.image_train import DistInfo
    with pytest.raises(KDMError, match="trains in one process: run it without torchrun"):
        ImageTrainer(model_cfg(nfe_train=[1, 2]), train_cfg(), CPU, intervals=4,
                     dist_info=DistInfo(rank=0, world_size=2, local_rank=0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_training_is_the_default_on_one_gpu_and_resumes(pairs, tmp_path):
    """A run killed after the captured step resumes from its checkpoint (fresh warm-up, new capture) to
    the uninterrupted run's result: same version, steps, data cursor, finite losses and close weights
    (cuDNN autotuning may pick other kernels in another process, so not bit for bit)."""
    mc, tc = run_cfgs(device="cuda", precision="bf16", channels_last=False)
    assert tc.cuda_graphs is None and ImageTrainer(mc, tc, torch.device("cuda")).cuda_graphs is True
    a, b = tmp_path / "a", tmp_path / "b"
    logs_a, logs_b = [], []
    va = train_image_student(pairs, mc, tc, str(a), progress=False, on_log=logs_a.append)
    assert train_image_student(pairs, mc, tc, str(b), progress=False, max_steps=5, on_log=logs_b.append) == va
    state = json.loads((b / "checkpoints" / "step-00000005" / "state.json").read_text())
    assert state["step"] == 5 and state["data"]["cursor"] == {"epoch": 0, "offset": 20}
    assert train_image_student(pairs, mc, tc, str(b), progress=False, on_log=logs_b.append) == va
    assert [r["step"] for r in logs_a] == [r["step"] for r in logs_b] == list(range(1, 8))
    for ra, rb in zip(logs_a, logs_b):
        assert rb["nonfinite_steps"] == ra["nonfinite_steps"] == 0
        assert rb["loss_total"] == pytest.approx(ra["loss_total"], rel=2e-2, abs=1e-4), ra["step"]
    sa, sb = load_file(str(a / "student.safetensors")), load_file(str(b / "student.safetensors"))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.isfinite(sb[k]).all() and torch.allclose(sa[k], sb[k], rtol=1e-2, atol=1e-3), k
    m = read_image_student_manifest(str(b))
    assert m.steps_done == 7 and m.nonfinite_steps == 0 and m.version == va


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("multi", [False, True], ids=["one-step", "multi-step"])
def test_cuda_graph_step_matches_the_eager_device_guarded_step(multi):
    """cuda_graphs: 3 eager warm-up steps, capture at the 4th, replays after; a non-finite batch after the
    capture is skipped on the device. Same losses and weights as the same step run eagerly; for a multi-step
    student (late anchors, output terms) the trajectory terms too."""
    cuda = torch.device("cuda")
    unet = TINY.model_copy(update={"dropout": 0.0})
    ms = dict(nfe_train=[1, 2], anchor_rho=3, trajectory_rows=2, trajectory_output=True) if multi else {}
    mc = model_cfg(res=32, adv_weight=0.01, latent_proj_dim=16, unet=unet, **ms)
    tc = train_cfg(device="cuda", precision="bf16", tf32=False)
    xT, x0 = batch(res=32)
    xt = torch.randn(x0.shape[0], 3, *x0.shape[1:], generator=torch.Generator().manual_seed(1)) if multi else None
    bad = x0.clone()
    bad[0, 0, 0, 0] = float("nan")
    seq = [(xT, x0)] * 5 + [(xT, bad), (xT, x0)]

    def run(graphs: bool):
        tr = ImageTrainer(mc, tc.model_copy(update={"cuda_graphs": graphs}), cuda,
                          **(dict(intervals=4, snapshot_scales=[0.1, 0.5, 1.0]) if multi else {}))
        assert tr.multi is multi
        out = []
        for i, (a, b) in enumerate(seq):
            assert tr.train_step(a, b, None, xt) is (graphs or i != 5)    # eager steps report the skip
            out.append(tr.pop_metrics())
        if multi:
            assert {"traj_lat", "traj_rec", "traj_out"} <= set(out[-1])
        return tr, out

    eager, m_eager = run(False)
    graph, m_graph = run(True)
    assert graph._graph is not None and eager._graph is None
    assert eager.nonfinite_steps == graph.nonfinite_steps == 1
    assert m_graph[5] == {} == m_eager[5]
    for a, b in zip(m_eager, m_graph):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=2e-2, abs=1e-4), k
    for name in ("model", "ema", "disc"):
        se, sg = snapshot(getattr(eager, name)), snapshot(getattr(graph, name))
        for k in se:
            assert torch.isfinite(sg[k].float()).all(), f"{name}.{k}"
            assert torch.allclose(sg[k].float(), se[k].float(), rtol=1e-2, atol=1e-3), f"{name}.{k}"


KILLED_CHILD = """
import pathlib, sys, time
from pipeline.training import image_train
sentinel, argv = sys.argv[1], sys.argv[2:]
real, calls = image_train.ImageTrainer.train_step, []
def train_step(self, *a, **kw):
    calls.append(1)
    if len(calls) == 5:                          # steps 1-4 done (checkpoint at 3): wait here to be killed
        pathlib.Path(sentinel).write_text("5")
        time.sleep(600)
    return real(self, *a, **kw)
image_train.ImageTrainer.train_step = train_step
from pipeline.cli import main
sys.exit(main(argv))
"""


def test_sigkilled_train_image_command_resumes_to_the_uninterrupted_weights(pairs, tmp_path):
    """`kdm train-image` killed (SIGKILL) after its step-3 checkpoint, in step 5; the same command again says
    it resumed from step 3 and ends with the uninterrupted run's weights, bitwise (CPU, one thread)."""
    import os
    import subprocess
    mc, tc = run_cfgs()
    ref = tmp_path / "ref"
    train_image_student(pairs, mc, tc, str(ref), progress=False)
    cfg = tmp_path / "student.json"
    cfg.write_text(json.dumps({"preset": "tiny", "model": json.loads(mc.model_dump_json()),
                               "train": json.loads(tc.model_dump_json())}))
    out, sentinel = tmp_path / "killed", tmp_path / "in-step-5"
    argv = ["train-image", "--pairs", pairs, "--config", str(cfg), "--out", str(out), "-q"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(sentinel), *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    from kill_helpers import sigkill_when
    sigkill_when(proc, sentinel.exists, 120, "train-image (killed during step 5)")
    assert not (out / "manifest.json").exists() and not (out / "student.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003"]
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]

    res = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed from its step-3 checkpoint in {out}" in res.stdout.splitlines()
    assert (out / "student.safetensors").read_bytes() == (ref / "student.safetensors").read_bytes()
    ma, mb = read_image_student_manifest(str(ref)), read_image_student_manifest(str(out))
    assert (mb.version, mb.steps_done, mb.weights_sha256) == (ma.version, 7, ma.weights_sha256)
    mref = [json.loads(ln) for ln in (ref / "metrics.jsonl").read_text().splitlines()]
    mout = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in mout] == list(range(1, 8))                   # step 4 logged once, not twice
    assert [r["loss_total"] for r in mout] == [r["loss_total"] for r in mref]


def test_adversarial_schedule_values_and_validation():
    m = model_cfg(res=32, adv_weight=0.02, adv_start=0.5, adv_rampup=0.25)
    # 8 steps: off for steps 0-3, then a 2-step ramp (half, full), then full
    assert [m.adv_weight_at(s, 8) for s in range(8)] == [0, 0, 0, 0, 0.01, 0.02, 0.02, 0.02]
    assert [model_cfg(adv_weight=0.01).adv_weight_at(s, 8) for s in (0, 7)] == [0.01, 0.01]   # official: constant
    with pytest.raises(ValueError, match="set adv_weight > 0"):
        model_cfg(adv_weight=0.0, adv_start=0.5)
    with pytest.raises(ValueError, match="exceeds 1"):
        model_cfg(adv_weight=0.01, adv_start=0.8, adv_rampup=0.3)


def test_adversarial_term_follows_its_schedule_in_training(tmp_path):
    """The engine applies adv_weight_at(step): no generator adversarial term before adv_start (the generator's
    update equals a D-less run's), D trains from step 0, the logged weight follows the ramp."""
    store = tmp_path / "pairs"
    write_synthetic_store(str(store), 16, (3, 32, 32), chunk_size=8)
    unet = TINY.model_copy(update={"dropout": 0.0})
    mc = model_cfg(res=32, unet=unet, latent_proj_dim=16, adv_weight=0.5, adv_start=0.5, adv_rampup=0.25)
    tc = train_cfg(steps=8, log_every=1, checkpoint_every=8)
    train_image_student(str(store), mc, tc, str(tmp_path / "run"), device="cpu", progress=False)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [round(r["adv_weight"], 6) for r in recs] == [0, 0, 0, 0, 0.25, 0.5, 0.5, 0.5]
    assert all(r["loss_disc"] > 0 for r in recs)               # D is trained from the first step
    # before adv_start the generator does what a run without D does (same data order and noise)
    plain = mc.model_copy(update={"adv_weight": 0.0, "adv_start": 0.0, "adv_rampup": 0.0})
    short = tc.model_copy(update={"steps": 4, "checkpoint_every": 4})
    a = ImageTrainer(mc, tc, CPU)
    b = ImageTrainer(plain, short, CPU)
    for i in range(3):
        xT, x0 = batch(res=32, seed=i)
        a.set_step(i)
        b.set_step(i)
        assert a.train_step(xT, x0) and b.train_step(xT, x0)
    sa, sb = snapshot(a.model), snapshot(b.model)
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


def test_a_multi_step_image_students_one_step_networks_train_as_the_one_step_student(tmp_path):
    """Same initialisation, batches, latent noise (drawn before the step, x_0's and x_T's from the same stream)
    and updates: after training, a multi-step image student's one-step networks are the one-step student's, to
    the bit, and its trajectory networks have trained; with the trajectory terms on every other step only
    (``trajectory_every``) too, which logs them in the intervals that trained them."""
    store = write_synthetic_store(str(tmp_path / "p"), 16, (3, 8, 8), chunk_size=8, snapshots=3)
    unet = TINY.model_copy(update={"dropout": 0.0})
    one, multi = model_cfg(res=8, unet=unet), model_cfg(res=8, unet=unet, nfe_train=[1, 2], anchor_rho=3,
                                                         trajectory_rows=2, trajectory_output=True)
    tc = train_cfg(steps=4, checkpoint_every=4)
    train_image_student(store.url, one, tc, str(tmp_path / "one"), progress=False)
    train_image_student(store.url, multi, tc, str(tmp_path / "multi"), progress=False)
    a, b = load_file(str(tmp_path / "one" / "student.safetensors")), load_file(str(tmp_path / "multi" /
                                                                                 "student.safetensors"))
    assert set(a) < set(b) and sorted({k.split(".")[1] for k in b if k.startswith("segment_ops")}) == ["0-3", "3-4"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    fresh = ImageTrainer(multi, tc, CPU, intervals=4)
    init = {k: v for k, v in fresh.ema.state_dict().items() if k.startswith(("traj_", "segment_ops"))}
    assert any(not torch.equal(v, b[k]) for k, v in init.items())
    sparse, logs = multi.model_copy(update={"trajectory_every": 2}), []
    train_image_student(store.url, sparse, tc.model_copy(update={"log_every": 1}), str(tmp_path / "sparse"),
                        progress=False, on_log=logs.append)
    c = load_file(str(tmp_path / "sparse" / "student.safetensors"))
    assert set(c) == set(b) and all(torch.equal(a[k], c[k]) for k in a)
    assert any(not torch.equal(b[k], c[k]) for k in init) and any(not torch.equal(v, c[k]) for k, v in init.items())
    assert [("loss_traj_lat" in r, "loss_traj_out" in r) for r in logs] == [(False, False), (True, True)] * 2
    assert all(r["loss_total"] == pytest.approx(r["loss_rec"] + r["loss_lat"] + r["loss_pred"]
                                                + r.get("loss_traj_out", 0.0), rel=1e-4) for r in logs)


def test_a_multi_step_image_student_trains_on_snapshots_and_samples_at_every_nfe(tmp_path):
    """The engine's eager path for model.nfe_train: batches carry x_t, the trajectory terms are in the losses,
    the run records its snapshots, and the student samples with 1, 2 and 4 evaluations."""
    from pipeline.evaluation.sample import generate_images, load_image_student
    store = write_synthetic_store(str(tmp_path / "p"), 16, (3, 8, 8), chunk_size=8, snapshots=3)
    mc = model_cfg(res=8, nfe_train=[1, 2, 4], trajectory_rows=2)
    assert "nfe_train" not in model_cfg(res=8).model_dump()               # one-step versions unchanged
    logs = []
    train_image_student(store.url, mc, train_cfg(steps=3), str(tmp_path / "s"), progress=False, on_log=logs.append)
    assert {"loss_traj_rec", "loss_traj_lat"} <= set(logs[-1]) and all(v == v for v in logs[-1].values())
    m = read_image_student_manifest(str(tmp_path / "s"))
    assert m.snapshots == store.manifest.snapshots and m.nfe_trained == (1, 2, 4) and m.intervals == 4
    model, _ = load_image_student(str(tmp_path / "s"))
    x_T = store.read("x_T", 0, 3)
    for nfe in (1, 2, 4):
        out = generate_images(model, x_T, nfe=nfe)
        assert out.shape == (3, 3, 8, 8) and torch.isfinite(torch.from_numpy(out)).all()
    with pytest.raises(KDMError, match="NFE 3"):
        generate_images(model, x_T, nfe=3)
    plain = write_synthetic_store(str(tmp_path / "plain"), 16, (3, 8, 8), chunk_size=8)
    with pytest.raises(KDMError, match="keeps no trajectory snapshot"):
        train_image_student(plain.url, mc, train_cfg(steps=1), str(tmp_path / "s2"), progress=False)
    # with the output terms: logged, finite, and part of the total (total = rec + lat + pred + traj_out)
    logs = []
    out_cfg = model_cfg(res=8, nfe_train=[1, 2, 4], trajectory_rows=2, trajectory_output=True)
    train_image_student(store.url, out_cfg, train_cfg(steps=2, log_every=1), str(tmp_path / "s3"), progress=False,
                        on_log=logs.append)
    last = logs[-1]
    assert last["loss_traj_out"] > 0
    assert last["loss_total"] == pytest.approx(last["loss_rec"] + last["loss_lat"] + last["loss_pred"]
                                               + last["loss_traj_out"], rel=1e-4)
