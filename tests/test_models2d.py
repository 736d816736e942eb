"""2-D KDM model pieces: sizes, shapes, losses, Koopman operators, checkerboard, ODE solvers, noise."""
import math

import pytest
import torch

from models.checkerboard import in_cell, sample_checkerboard
from models.kdm2d import KDM2D, KDMForward
from models.koopman import FactorizedKoopman, LinearKoopman, make_operator
from models.losses import kdm_losses
from models.samplers import integrate_ode, seeded_noise
from storage_schemas import KDM2DConfig


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


# --- KDM2D -------------------------------------------------------------------------------------------

def test_default_kdm2d_has_the_official_parameter_count():
    torch.manual_seed(0)
    m = KDM2D.from_config(KDM2DConfig())
    assert n_params(m) == 858_114
    assert n_params(m.x0_encoder) == 264_192
    assert n_params(m.xT_encoder) == 264_192
    assert n_params(m.decoder) == 263_938
    assert n_params(m.koopman) == 65_792
    assert isinstance(m.koopman, LinearKoopman)


def test_layer_structure_follows_the_config():
    m = KDM2D(dim=3, hidden=8, latent_dim=5, encoder_layers=3, decoder_layers=2)
    enc = [l for l in m.x0_encoder.main if isinstance(l, torch.nn.Linear)]
    dec = [l for l in m.decoder.main if isinstance(l, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in enc] == [(4, 8), (8, 8), (8, 5)]
    assert [(l.in_features, l.out_features) for l in dec] == [(6, 8), (8, 3)]
    assert not isinstance(m.decoder.main[-1], type(m.decoder.main[1]))   # decoder output is not activated
    assert len(m.x0_encoder.main) == 6                                    # every encoder layer is activated


def test_forward_shapes_and_noise():
    torch.manual_seed(0)
    m = KDM2D(hidden=16, latent_dim=8, encoder_layers=2, decoder_layers=2, latent_noise=0.4)
    x0, xT = torch.randn(7, 2), torch.randn(7, 2)
    out = m(x0, xT, generator=torch.Generator().manual_seed(1))
    for name in ("z0", "zT", "z0_noisy", "zT_noisy", "z_push"):
        assert getattr(out, name).shape == (7, 8), name
    assert out.x0_rec.shape == (7, 2) and out.x0_push.shape == (7, 2)
    assert not torch.equal(out.z0, out.z0_noisy)
    assert torch.allclose(out.z_push, m.koopman(out.zT_noisy))
    assert m(x0, xT, decode_push=False).x0_push is None
    # the same generator seed gives the same noisy latents
    again = m(x0, xT, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.z0_noisy, again.z0_noisy) and torch.equal(out.zT_noisy, again.zT_noisy)


def test_forward_takes_external_noise_and_the_spectral_kind():
    torch.manual_seed(0)
    m = KDM2D(hidden=16, latent_dim=8, encoder_layers=2, decoder_layers=2, operator="factorized")
    x0, xT = torch.randn(5, 2), torch.randn(5, 2)
    g = torch.Generator().manual_seed(1)
    eps0, epsT = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    drawn = m(x0, xT, generator=torch.Generator().manual_seed(1))
    given = m(x0, xT, eps0=eps0, epsT=epsT, spectral="unit-disk-uniform")
    assert isinstance(given, tuple) and drawn.spectral is None
    for name in ("z0_noisy", "zT_noisy", "z_push", "x0_rec", "x0_push"):
        assert torch.equal(getattr(drawn, name), getattr(given, name)), name
    assert torch.equal(given.spectral, m.koopman.spectral_loss("unit-disk-uniform"))
    assert "spectral" in kdm_losses(x0, given) and "spectral" not in kdm_losses(x0, drawn)


def test_zero_latent_noise_gives_clean_latents():
    m = KDM2D(hidden=16, latent_dim=8, encoder_layers=2, decoder_layers=2, latent_noise=0.0)
    out = m(torch.randn(4, 2), torch.randn(4, 2))
    assert torch.equal(out.z0, out.z0_noisy) and torch.equal(out.zT, out.zT_noisy)


def test_generate_is_deterministic_and_matches_the_noise_free_push():
    torch.manual_seed(0)
    m = KDM2D(hidden=16, latent_dim=8, encoder_layers=2, decoder_layers=2).eval()
    xT = torch.randn(11, 2)
    a, b = m.generate(xT), m.generate(xT)
    assert a.shape == (11, 2)
    assert torch.equal(a, b)
    expect = m.decoder(m.koopman(m.xT_encoder(xT, 1.0)), 0.0)
    assert torch.equal(a, expect)
    # a sample depends on its own x_T only (no batch coupling)
    assert torch.allclose(m.generate(xT[3:4]), a[3:4], atol=1e-6)


# --- losses ------------------------------------------------------------------------------------------

def _hand_forward():
    z0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z_push = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    x0_rec = torch.tensor([[0.5, 0.0], [0.0, 0.0]])
    x0_push = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    dummy = torch.zeros(2, 2)
    return KDMForward(z0=z0, zT=dummy, z0_noisy=dummy, zT_noisy=dummy, z_push=z_push, x0_rec=x0_rec,
                      x0_push=x0_push)


def test_kdm_losses_exact_values():
    x0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = _hand_forward()
    losses = kdm_losses(x0, out)
    rec = ((0.5 - 1.0) ** 2 + 0 + 0 + (0 - 1.0) ** 2) / 4          # 1.25 / 4
    lat = (0 + 1.0 + 0 + 4.0) / 4                                    # (z_push - z0)^2
    pred = (0 + 1.0 + 1.0 + 0) / 4
    assert losses["rec"].item() == pytest.approx(rec)
    assert losses["lat"].item() == pytest.approx(lat)
    assert losses["pred"].item() == pytest.approx(pred)
    assert losses["total"].item() == pytest.approx(rec + lat + pred)
    assert set(losses) == {"rec", "lat", "pred", "total"}


def test_without_pred_loss_total_excludes_pred_but_reports_it():
    x0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    losses = kdm_losses(x0, _hand_forward(), use_pred_loss=False)
    assert losses["pred"].item() == pytest.approx(0.5)
    assert losses["total"].item() == pytest.approx(1.25 / 4 + 5.0 / 4)


def test_pred_loss_carries_no_gradient_when_disabled():
    x0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = _hand_forward()
    out = out._replace(x0_push=out.x0_push.clone().requires_grad_(True),
                       x0_rec=out.x0_rec.clone().requires_grad_(True))
    kdm_losses(x0, out, use_pred_loss=False)["total"].backward()
    assert out.x0_push.grad is None
    assert torch.allclose(out.x0_rec.grad, 2 * (out.x0_rec.detach() - x0) / 4)
    out.x0_rec.grad = None
    kdm_losses(x0, out, use_pred_loss=True)["total"].backward()
    assert torch.allclose(out.x0_push.grad, 2 * (out.x0_push.detach() - x0) / 4)


def test_spectral_term_is_added_and_missing_push_is_an_error():
    x0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    losses = kdm_losses(x0, _hand_forward()._replace(spectral=torch.tensor(0.25)))
    assert losses["spectral"].item() == 0.25
    assert losses["total"].item() == pytest.approx(1.25 / 4 + 5.0 / 4 + 0.5 + 0.25)
    out = _hand_forward()._replace(x0_push=None)
    with pytest.raises(ValueError, match="decode_push=True"):
        kdm_losses(x0, out, use_pred_loss=True)
    assert "pred" not in kdm_losses(x0, out, use_pred_loss=False)


# --- Koopman operators -------------------------------------------------------------------------------

def _moduli(op: FactorizedKoopman) -> torch.Tensor:
    re, im = op.eigenvalues()
    return torch.sqrt(re ** 2 + im ** 2)


def test_factorized_eigenvalues_stay_inside_the_unit_disk_under_training():
    op = FactorizedKoopman(16, generator=torch.Generator().manual_seed(0))
    assert (_moduli(op) < 1).all() and (_moduli(op) > 0).all()
    opt = torch.optim.Adam(op.parameters(), lr=0.5)
    before = _moduli(op).detach().clone()
    for _ in range(8):   # push every eigenvalue outwards as hard as possible
        loss = -_moduli(op).sum() - op(torch.randn(32, 16)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _moduli(op)
    assert (after > before).all()              # the optimiser did move them outwards
    assert (after < 1).all()                   # ...but never across the unit circle


def test_factorized_matrix_is_the_applied_map():
    op = FactorizedKoopman(6, generator=torch.Generator().manual_seed(1))
    z = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    M = op.matrix()
    assert M.shape == (6, 6)
    assert torch.allclose(z @ M.T, op(z), atol=1e-6)
    lin = LinearKoopman(6)
    torch.nn.init.zeros_(lin.linear.bias)
    assert torch.allclose(z @ lin.matrix().T, lin(z), atol=1e-6)


def test_factorized_init_is_reproducible_with_a_generator():
    a = FactorizedKoopman(4, generator=torch.Generator().manual_seed(3))
    b = FactorizedKoopman(4, generator=torch.Generator().manual_seed(3))
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


def test_spectral_losses():
    op = FactorizedKoopman(8, generator=torch.Generator().manual_seed(0))
    inv = op.inverse_loss()
    assert inv.dim() == 0 and torch.isfinite(inv) and inv.item() >= 0
    assert op.spectral_loss("none").item() == 0.0
    assert op.spectral_loss("inverse").item() == pytest.approx(inv.item())
    disk = op.spectral_loss("unit-disk-uniform")
    assert torch.isfinite(disk) and disk.item() > inv.item()
    with pytest.raises(ValueError, match="unknown spectral loss 'bogus'"):
        op.spectral_loss("bogus")
    with pytest.raises(ValueError, match="needs the factorized operator"):
        LinearKoopman(4).spectral_loss("inverse")
    assert LinearKoopman(4).spectral_loss("none").item() == 0.0


def test_inverse_loss_is_zero_for_an_exact_inverse():
    op = FactorizedKoopman(3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        op.P_re.copy_(torch.eye(3))
        op.P_im.zero_()
        op.P_inv_re.copy_(torch.eye(3))
        op.P_inv_im.zero_()
    assert op.inverse_loss().item() == pytest.approx(0.0, abs=1e-12)


def test_make_operator():
    assert isinstance(make_operator("linear", 4), LinearKoopman)
    assert isinstance(make_operator("factorized", 4), FactorizedKoopman)
    with pytest.raises(ValueError, match="expected 'linear' or 'factorized'"):
        make_operator("diagonal", 4)


# --- checkerboard ------------------------------------------------------------------------------------

def test_checkerboard_samples_are_in_filled_cells_with_equal_mass():
    x = sample_checkerboard(10_000, generator=torch.Generator().manual_seed(0))
    assert x.shape == (10_000, 2)
    assert in_cell(x).all()
    u = torch.floor(x * 0.45).long() + 2                    # cell indices 0..3
    assert u.min() >= 0 and u.max() <= 3
    assert ((u[:, 0] + u[:, 1]) % 2 == 0).all()             # only the 8 filled cells
    counts = torch.bincount(u[:, 0] * 4 + u[:, 1], minlength=16).float() / len(x)
    filled = [c for c in range(16) if (c // 4 + c % 4) % 2 == 0]
    assert len(filled) == 8
    for c in filled:
        assert abs(counts[c].item() - 1 / 8) < 0.02, (c, counts[c].item())
    assert counts[[c for c in range(16) if c not in filled]].sum() == 0


def test_in_cell_rejects_empty_cells_and_off_board_points():
    pts = torch.tensor([[0.5, 0.5], [0.5, -0.5], [2.5, 0.5], [-1.5, -1.5], [0.5, 2.1]]) / 0.45
    assert in_cell(pts).tolist() == [True, False, False, True, False]


def test_checkerboard_rejects_odd_boards():
    with pytest.raises(ValueError, match="even number of cells"):
        sample_checkerboard(10, low=-1.5, high=1.5)


# --- ODE solvers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["euler", "midpoint", "heun"])
def test_constant_velocity_moves_by_exactly_t_times_v(method):
    v = torch.tensor([0.5, -2.0], dtype=torch.float64)
    x = torch.randn(5, 2, dtype=torch.float64)
    out = integrate_ode(lambda x_, t: v.expand_as(x_), x, steps=7, method=method, t0=0.25, t1=1.0)
    assert torch.allclose(out, x + 0.75 * v, atol=1e-12, rtol=0)


def test_linear_growth_converges_to_e_and_second_order_beats_euler():
    x = torch.ones(1, 1, dtype=torch.float64)
    err = {m: abs(integrate_ode(lambda x_, t: x_, x, steps=10, method=m).item() - math.e)
           for m in ("euler", "midpoint", "heun")}
    assert err["euler"] == pytest.approx(math.e - 1.1 ** 10, rel=1e-9)
    assert err["euler"] < 0.15
    assert err["midpoint"] < 0.005 and err["heun"] < 0.005
    assert err["heun"] < err["euler"] / 10 and err["midpoint"] < err["euler"] / 10


def test_ode_passes_the_time_and_rejects_bad_arguments():
    seen = []
    integrate_ode(lambda x_, t: (seen.append(t[0].item()), torch.zeros_like(x_))[1], torch.zeros(3, 1),
                  steps=4, method="euler")
    assert seen == pytest.approx([0.0, 0.25, 0.5, 0.75])
    with pytest.raises(ValueError, match="steps must be >= 1"):
        integrate_ode(lambda x_, t: x_, torch.zeros(1, 1), steps=0)
    with pytest.raises(ValueError, match="unknown ODE method 'rk4'"):
        integrate_ode(lambda x_, t: x_, torch.zeros(1, 1), steps=1, method="rk4")


# --- per-seed noise ----------------------------------------------------------------------------------

def test_seeded_noise_depends_only_on_the_seed():
    both = seeded_noise([5, 6], (2,))
    assert both.shape == (2, 2) and both.dtype == torch.float32
    assert torch.equal(both[1], seeded_noise([6], (2,))[0])
    assert torch.equal(both[0], seeded_noise([9, 5, 7], (2,))[1])
    assert not torch.equal(both[0], both[1])
    assert torch.equal(seeded_noise([6], (2,), scale=3.0), 3.0 * seeded_noise([6], (2,)))
    assert torch.equal(seeded_noise([6], (2,))[0], torch.randn(2, generator=torch.Generator().manual_seed(6)))
    assert seeded_noise([1, 2, 3], (2, 3), dtype=torch.float64).shape == (3, 2, 3)


def test_seeded_noise_is_standard_normal():
    x = seeded_noise(range(4000), (2,))
    assert abs(x.mean().item()) < 0.05
    assert abs(x.std().item() - 1.0) < 0.05
