"""EDM preconditioning, losses, Heun sampler, per-seed latents, flow-matching adapter, EDM-pickle import,
and the EDM teacher bootstrap (CPU)."""
from __future__ import annotations

import json
import math
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from edm_persistence import make_pickles, write_fake_edm
from image_fixtures import TINY_UNET, image_folder, write_archive
from models.edm import FastDenoiser, EDMLoss, EDMPrecond, FlowMatchingDenoiser, VELoss, VEPrecond, VPLoss, VPPrecond, Denoiser
from models.samplers import edm_heun, edm_latents, edm_time_steps, integrate_ode, seeded_noise
from pipeline.storage import artifacts
from pipeline.data.datasets import prepare_image_dataset
from pipeline.teachers.edm_pickle import import_edm_pickle, read_edm_pickle
from pipeline.errors import ArtifactExists, KDMError
from pipeline.teachers.flow_matching import load_denoiser, read_teacher_manifest
from pipeline.teachers.bootstrap import load_edm_teacher_config, train_edm_teacher

TINY = dict(img_resolution=8, img_channels=3, **TINY_UNET)


pytestmark = pytest.mark.usefixtures("one_thread")


def perturbed(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


# --- preconditioning ---------------------------------------------------------------------------------

def test_edm_precond_matches_the_edm_formulas():
    torch.manual_seed(0)
    net = perturbed(EDMPrecond(**TINY))
    x = torch.randn(3, 3, 8, 8) * 2
    sigma = torch.tensor([0.002, 1.0, 80.0])
    s = sigma.reshape(-1, 1, 1, 1)
    sd = 0.5
    F = net.model(x / (sd ** 2 + s ** 2).sqrt(), sigma.log() / 4)
    expect = sd ** 2 / (s ** 2 + sd ** 2) * x + s * sd / (s ** 2 + sd ** 2).sqrt() * F
    assert torch.allclose(net(x, sigma), expect, atol=1e-5)
    assert (net.sigma_min, net.sigma_max, net.sigma_data) == (0, float("inf"), 0.5)
    assert isinstance(net, Denoiser)


def test_vp_and_ve_preconds():
    torch.manual_seed(0)
    vp = perturbed(VPPrecond(**TINY))
    assert vp.sigma_min == pytest.approx(0.0010, abs=5e-5) and vp.sigma_max == pytest.approx(152.17, abs=0.01)
    sigma = torch.tensor([0.5, 3.0])
    assert torch.allclose(vp.sigma(vp.sigma_inv(sigma)), sigma, rtol=1e-5)
    x = torch.randn(2, 3, 8, 8)
    s = sigma.reshape(-1, 1, 1, 1)
    F = vp.model(x / (s ** 2 + 1).sqrt(), 999 * vp.sigma_inv(sigma))
    assert torch.allclose(vp(x, sigma), x - s * F, atol=1e-5)
    ve = perturbed(VEPrecond(**TINY))
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100)
    assert torch.allclose(ve(x, sigma), x + s * ve.model(x, (0.5 * sigma).log()), atol=1e-5)


def test_state_dict_is_edms_model_prefix_and_labels_default_to_zero():
    torch.manual_seed(0)
    net = perturbed(EDMPrecond(**TINY, label_dim=4))
    keys = list(net.state_dict())
    assert all(k.startswith("model.") for k in keys) and "model.map_label.weight" in keys
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor(1.3)
    assert torch.allclose(net(x, sigma), net(x, sigma, torch.zeros(2, 4)), atol=1e-6)
    assert not torch.allclose(net(x, sigma), net(x, sigma, torch.eye(4)[:2]))
    with pytest.raises(ValueError, match="DhariwalUNet"):
        EDMPrecond(**TINY, model_type="DhariwalUNet")


# --- losses ------------------------------------------------------------------------------------------

def test_edm_loss_defaults_and_formula():
    loss = EDMLoss()
    assert (loss.P_mean, loss.P_std, loss.sigma_data) == (-1.2, 1.2, 0.5)
    seen = {}

    def net(x, sigma, labels=None, augment_labels=None):
        seen["sigma"] = sigma
        return torch.zeros_like(x)

    y = torch.ones(4, 3, 8, 8) * 0.5
    out = loss(net, y, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    sigma = (torch.randn([4, 1, 1, 1], generator=g) * 1.2 - 1.2).exp()
    assert torch.allclose(seen["sigma"], sigma)
    weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    assert torch.allclose(out, weight * 0.25 * torch.ones_like(y))
    assert out.shape == y.shape
    for cls in (VPLoss, VELoss):        # the other EDM losses run and weight by 1 / sigma^2
        assert torch.isfinite(cls()(net, y, generator=torch.Generator().manual_seed(1))).all()


# --- sampler -----------------------------------------------------------------------------------------

def test_time_steps_are_edms():
    t = edm_time_steps(18)
    assert t.dtype == torch.float64 and len(t) == 19 and t[-1] == 0
    assert [round(v, 2) for v in t[:4].tolist()] == [80.0, 57.59, 40.79, 28.37]
    assert t[-2].item() == pytest.approx(0.002) and t[-3].item() == pytest.approx(0.0075, abs=5e-5)
    assert [round(v, 2) for v in edm_time_steps(40)[:3].tolist()] == [80.0, 69.45, 60.12]


def reference_edm_sampler(net, latents, class_labels=None, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7):
    """EDM generate.py's edm_sampler with S_churn=0 (the randn_like term is 0 * noise and is dropped)."""
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=latents.device)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        t_hat = net.round_sigma(t_cur)
        x_hat = x_cur
        denoised = net(x_hat, t_hat, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            denoised = net(x_next, t_next, class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


@pytest.mark.parametrize("label_dim", [0, 3])
def test_edm_heun_is_edms_sampler(label_dim):
    torch.manual_seed(0)
    net = perturbed(EDMPrecond(**TINY, label_dim=label_dim))
    eps = torch.randn(2, 3, 8, 8)
    labels = torch.eye(3)[[0, 2]] if label_dim else None
    got = edm_heun(net, 80 * eps.double(), labels, num_steps=5)   # EDM scales in float64
    assert got.dtype == torch.float64
    assert torch.equal(got, reference_edm_sampler(net, eps, labels, num_steps=5))


def test_fast_denoiser_and_float32_state_stay_close_to_the_reference():
    torch.manual_seed(0)
    net = perturbed(EDMPrecond(**TINY))
    x_T = 80 * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = edm_heun(net, x_T, num_steps=6)
    f32 = edm_heun(net, x_T, num_steps=6, state_dtype=torch.float32)
    assert f32.dtype == torch.float32 and (f32.double() - ref).abs().max() < 1e-4
    fast = FastDenoiser(net, dtype=torch.bfloat16)
    assert (fast.sigma_min, fast.sigma_max, fast.label_dim) == (net.sigma_min, net.sigma_max, 0)
    out = edm_heun(fast, x_T, num_steps=6, state_dtype=torch.float32)
    err = (out.double() - ref).abs()
    assert out.dtype == torch.float32 and 0 < err.mean() < 0.1    # reduced precision: close, not equal
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        FastDenoiser(net, dtype=torch.float32)


def test_edm_heun_nfe_and_gaussian_exactness():
    """Data N(0, s^2 I): D(x, sigma) = s^2 / (s^2 + sigma^2) x and the ODE maps x_T to s x_T / sqrt(s^2 + 80^2)."""
    s2, calls = 0.25, []

    class Gauss(torch.nn.Module):
        sigma_min, sigma_max, label_dim = 0.0, float("inf"), 0

        def forward(self, x, sigma, class_labels=None):
            calls.append(float(sigma))
            return s2 / (s2 + torch.as_tensor(sigma, dtype=x.dtype) ** 2) * x

        def round_sigma(self, sigma):
            return torch.as_tensor(sigma)

    x_T = 80 * torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x0 = edm_heun(Gauss(), x_T, num_steps=18)
    assert len(calls) == 35                                 # NFE = 2N - 1
    exact = x_T.double() * math.sqrt(s2) / math.sqrt(s2 + 80 ** 2)
    errors = [((edm_heun(Gauss(), x_T, num_steps=n) - exact).abs().max() / exact.abs().max()).item()
              for n in (18, 40, 100)]
    assert errors[0] < 0.06 and errors[2] < 2e-3 and errors[0] > errors[1] > errors[2]   # converges


def test_edm_heun_refuses_a_sigma_max_the_denoiser_lacks():
    net = VEPrecond(**TINY)
    with pytest.raises(ValueError, match="sigma_max=120"):
        edm_heun(net, torch.zeros(1, 3, 8, 8), sigma_max=120)


def test_edm_latents_follow_stacked_random_generator():
    seeds = [3, 0, 2 ** 32 + 7]
    eps, labels = edm_latents(seeds, (3, 4, 4), label_dim=10)
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(s % 2 ** 32)
        assert torch.equal(eps[i], torch.randn(3, 4, 4, generator=g))
        assert labels[i] == torch.randint(10, size=(), generator=g)      # same generator, after the latent
    sub, sub_lab = edm_latents(seeds[1:], (3, 4, 4), label_dim=10)       # independent of batch composition
    assert torch.equal(sub, eps[1:]) and torch.equal(sub_lab, labels[1:])
    plain, none = edm_latents([0, 5], (2,))
    assert none is None and torch.equal(plain, seeded_noise([0, 5], (2,)))


# --- flow-matching adapter ---------------------------------------------------------------------------

def test_flow_matching_denoiser_recovers_the_data_and_the_ode():
    c = torch.tensor([0.7, -1.3])

    def point_mass(x_t, t):      # ideal velocity for data = c: (c - x_t) / (1 - t)
        return (c - x_t) / (1 - t[:, None])

    den = FlowMatchingDenoiser(point_mass)
    x = torch.randn(5, 2) * 10
    for sigma in (0.01, 1.0, 80.0):
        assert torch.allclose(den(x, torch.tensor(sigma, dtype=torch.float64)), c.expand(5, 2), atol=1e-5)
    x0 = edm_heun(den, 80 * torch.randn(5, 2), num_steps=6)
    assert torch.allclose(x0.float(), c.expand(5, 2), atol=1e-4)

    # a linear velocity field: Heun on the adapter and a fine ODE integration agree
    A = torch.tensor([[0.3, -0.2], [0.1, 0.4]])

    def linear(x_t, t):
        return x_t @ A.T + t[:, None]

    eps = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    ode = integrate_ode(linear, eps * 80 / 81, 2000, "heun", t0=1 / 81)   # x_t = x / (1 + sigma), sigma = 80
    heun = edm_heun(FlowMatchingDenoiser(linear), 80 * eps, num_steps=200).float()
    assert torch.allclose(heun, ode, atol=1e-3)


# --- EDM network pickles -----------------------------------------------------------------------------

EDM_KWARGS = dict(img_resolution=8, img_channels=3, label_dim=0, use_fp16=False, model_type="SongUNet",
                  embedding_type="positional", encoder_type="standard", decoder_type="standard",
                  channel_mult_noise=1, resample_filter=[1, 1], model_channels=8, channel_mult=[1, 2],
                  num_blocks=1, attn_resolutions=[4], dropout=0.13, augment_dim=2)


@pytest.fixture(scope="module")
def fake_edm(tmp_path_factory):
    root = write_fake_edm(tmp_path_factory.mktemp("edm-code"))
    out = tmp_path_factory.mktemp("pkl")
    vp = {k: v for k, v in EDM_KWARGS.items() if k != "model_type"}      # VPPrecond defaults to SongUNet
    return make_pickles(root, [(out / "edm-tiny-uncond-vp.pkl", EDM_KWARGS, "EDMPrecond"),
                               (out / "edm-tiny-cond-vp.pkl", dict(EDM_KWARGS, label_dim=3), "EDMPrecond"),
                               (out / "baseline-tiny-vp.pkl", dict(vp, beta_min=0.2), "VPPrecond")])


def test_pickle_is_refused_without_opt_in_and_pin(fake_edm, tmp_path):
    pkl = fake_edm[0]
    sha = artifacts.sha256_file(str(pkl))
    with pytest.raises(KDMError) as e:
        import_edm_pickle(str(pkl), str(tmp_path / "t"))
    assert "allow_pickle=True" in str(e.value) and sha in str(e.value) and "code" in str(e.value)
    with pytest.raises(KDMError) as e:
        import_edm_pickle(str(pkl), str(tmp_path / "t"), allow_pickle=True)
    assert "without a pinned sha256" in str(e.value) and sha in str(e.value)
    with pytest.raises(KDMError) as e:
        import_edm_pickle(str(pkl), str(tmp_path / "t"), allow_pickle=True, sha256="0" * 64)
    assert "mismatch" in str(e.value) and sha in str(e.value)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("which", [0, 1, 2])
def test_pickle_import_reproduces_the_edm_network(fake_edm, tmp_path, monkeypatch, which):
    pkl = fake_edm[which]
    sentinel = tmp_path / "executed.txt"
    monkeypatch.setenv("EDM_FIXTURE_SENTINEL", str(sentinel))
    sha = artifacts.sha256_file(str(pkl))
    out = str(tmp_path / "teacher")
    m = import_edm_pickle(str(pkl), out, allow_pickle=True, sha256=sha.upper())
    assert not sentinel.exists()                                   # the embedded source never ran
    assert "torch_utils" not in sys.modules and "training" not in sys.modules
    assert m.kind == "edm" and m.id.startswith("edm-") and m.source.sha256 == sha
    assert m.source.class_name == ("VPPrecond" if which == 2 else "EDMPrecond") and m.source.persistence_version == 6
    assert m.source.loss == {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5}
    assert m.model.precond == ("vp" if which == 2 else "edm")
    assert m.model.augment_dim == 2 and m.model.unet.dropout == 0.13
    assert m.model.label_dim == (3 if which == 1 else 0)
    assert m.model.precond_kwargs == ({"beta_min": 0.2} if which == 2 else {})
    assert sha in m.origin
    assert json.loads((Path(out) / "config.json").read_text())["unet"]["channel_mult"] == [1, 2]
    ref = torch.load(str(pkl) + ".ref.pt", weights_only=True)
    net, _ = load_denoiser(out)
    got = net(ref["x"], ref["sigma"], ref.get("labels"))
    assert torch.allclose(got, ref["D"], atol=1e-6)
    assert import_edm_pickle(str(pkl), out, allow_pickle=True, sha256=sha) == m   # no-op
    # the pickle's other entries are plain data; the persistent objects are records, never instances
    data, _ = read_edm_pickle(str(pkl), allow_pickle=True, sha256=sha)
    assert data["dataset_kwargs"]["path"] == "cifar.zip" and data["augment_pipe"] is None
    assert type(data["ema"]).__name__ == "PersistentRecord" and "class SongUNet" in data["ema"].module_src
    st = load_file(str(Path(out) / "weights.safetensors"))
    assert set(st) == set(net.state_dict())


def test_hostile_pickle_is_refused_even_with_opt_in(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    pkl = tmp_path / "evil.pkl"
    pkl.write_bytes(pickle.dumps({"ema": Evil()}))
    sha = artifacts.sha256_file(str(pkl))
    with pytest.raises(KDMError, match="system"):
        import_edm_pickle(str(pkl), str(tmp_path / "t"), allow_pickle=True, sha256=sha)
    assert not marker.exists()
    bad = tmp_path / "list.pkl"
    bad.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(KDMError, match="not EDM's dict"):
        import_edm_pickle(str(bad), str(tmp_path / "t"), allow_pickle=True, sha256=artifacts.sha256_file(str(bad)))


# --- teacher bootstrap -------------------------------------------------------------------------------

def tiny_teacher_cfg(**over):
    sets = ["unet.model_channels=8", "unet.channel_mult=[1,2]", "unet.num_blocks=1", "unet.attn_resolutions=[4]",
            "batch_size=8", "steps=4", "checkpoint_every=2", "log_every=1", "preview_samples=4", "device=cpu",
            "lr_rampup_images=16", "ema_halflife_images=32"] + [f"{k}={v}" for k, v in over.items()]
    return load_edm_teacher_config("cifar10-mini", sets=sets)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("boot")
    members, _ = image_folder(np.random.default_rng(0), per_class={"train": 6, "test": 1})
    archive = write_archive(root / "a.tgz", members)
    prepare_image_dataset(str(archive), str(root / "ds"), progress=False)
    return str(root / "ds")


def test_presets_load():
    mini = load_edm_teacher_config("cifar10-mini")
    full = load_edm_teacher_config("cifar10-edm")
    assert mini.unet.model_channels == 64 and mini.batch_size == 256 and mini.device == "cuda"
    assert full.unet.model_channels == 128 and full.unet.channel_mult == (2, 2, 2) and full.unet.dropout == 0.13
    assert full.batch_size == 512 and full.lr == 1e-3 and full.steps * full.batch_size == 200_000_000
    assert full.ema_halflife_images == 500_000 and full.xflip
    with pytest.raises(KDMError, match="not an EDM image teacher"):
        load_edm_teacher_config("checkerboard")
    from pipeline import presets
    with pytest.raises(KDMError, match="kdm teacher bootstrap"):
        presets.load("teacher", "cifar10-mini")


def test_bootstrap_trains_resumes_and_writes_a_teacher(dataset, tmp_path):
    cfg = tiny_teacher_cfg(use_labels="true")
    ref = str(tmp_path / "ref")
    m = train_edm_teacher(dataset, cfg, ref, progress=False)
    assert m.kind == "edm" and m.model.label_dim == 3 and m.model.img_resolution == 8
    assert m.dataset.version.startswith("ds-") and m.training == cfg and math.isfinite(m.final_loss)
    files = sorted(p.name for p in Path(ref).iterdir())
    assert files == ["config.json", "manifest.json", "metrics.jsonl", "preview.png", "run.json", "weights.safetensors"]
    assert read_teacher_manifest(ref) == m
    net, _ = load_denoiser(ref)
    assert isinstance(net, EDMPrecond) and net.label_dim == 3

    out = str(tmp_path / "resumed")
    assert train_edm_teacher(dataset, cfg, out, progress=False, stop_after=3) is None   # killed after step 3
    assert (Path(artifacts.partial_url(out)) / "checkpoints" / "step-00000002").is_dir()
    m2 = train_edm_teacher(dataset, cfg, out, progress=False)
    assert m2.id == m.id and m2.weights_sha256 == m.weights_sha256                      # bitwise equal EMA
    assert train_edm_teacher(dataset, cfg, out, progress=False) == m2                    # finished: a no-op
    with pytest.raises(ArtifactExists):
        train_edm_teacher(dataset, tiny_teacher_cfg(steps=5), out, progress=False)


def test_teacher_log_has_steady_rates_and_host_readings(dataset, tmp_path, monkeypatch):
    """Each teacher record carries the interval's steady-state images/s (none for the first interval of a
    session, checkpoint writes left out) and the host readings; off CUDA no GPU fields."""
    import time
    from pipeline.storage import checkpoints
    save, pause = checkpoints.save_checkpoint, 0.4

    def slow_save(*args, **kw):
        time.sleep(pause)
        return save(*args, **kw)
    monkeypatch.setattr(checkpoints, "save_checkpoint", slow_save)
    cfg = tiny_teacher_cfg(steps=5, checkpoint_every=2, preview_samples=0)
    out = tmp_path / "t"
    logs = []
    train_edm_teacher(dataset, cfg, str(out), progress=False, on_log=logs.append)
    assert [r["step"] for r in logs] == [1, 2, 3, 4, 5]
    assert list(logs[0])[:6] == ["step", "loss", "lr", "ema_beta", "images_per_s", "elapsed_s"]
    assert logs[0]["train_images_per_s"] is None and all(r["train_images_per_s"] > 0 for r in logs[1:])
    for r in (logs[2], logs[4]):          # after the checkpoints of steps 2 and 4
        assert cfg.batch_size / r["images_per_s"] - cfg.batch_size / r["train_images_per_s"] >= pause - 0.01
    assert all(r["host_cpu_ms_per_step"] > 0 and r["host_cpu_cores"] >= 0 for r in logs)
    assert not any(k.startswith("gpu_") for r in logs for k in r)
    saved = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert saved == logs


@pytest.mark.gpu
def test_bootstrap_asks_for_a_gpu_that_is_absent(dataset, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(KDMError, match="no CUDA GPU"):
        train_edm_teacher(dataset, tiny_teacher_cfg(device="cuda"), str(tmp_path / "t"), progress=False)
