"""Multi-step Koopman students (models/multistep.py): the grid, the rollout, the training pass, and the 2-D
pipeline around them (train on snapshots, sample at every NFE, the frontier of the evaluation). CPU-sized."""
import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from models import multistep as ms
from models.kdm2d import KDM2D
from models.kdm_image import OFFICIAL_UNET, KDMImage
from models.losses import kdm_losses
from pipeline.cli import main
from pipeline.errors import KDMError
from storage_schemas import EvaluationReport, KDM2DConfig, StudentRunConfig

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(hidden=16, latent_dim=8, encoder_layers=2, decoder_layers=2)


def test_snapshot_scales():
    assert ms.snapshot_scales("flow-matching-time", (0.25, 0.5)) == [1.0, 1.0]
    assert ms.snapshot_scales("edm-sigma", (80.0, 1.2, 0.0)) == pytest.approx([1 / 80.0015624, 1 / 1.3, 2.0])


def test_anchors_and_segments():
    assert ms.anchors(9, 1) == [0, 9] and ms.anchors(9, 2) == [0, 5, 9] and ms.anchors(9, 4) == [0, 2, 5, 7, 9]
    assert ms.anchors(4, 2) == [0, 2, 4] and ms.anchors(4, 4) == [0, 1, 2, 3, 4] and ms.anchors(3, 3) == [0, 1, 2, 3]
    assert ms.segments(9, (1, 2)) == [(0, 5), (0, 9), (5, 9)]
    assert ms.times(4, 1.0) == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="1 <= NFE <= 9"):
        ms.anchors(9, 10)


def test_anchors_toward_x0():
    # a_k = floor(n (1 - (1 - k/m)^rho) + 1/2); rho = 1 is the even spacing exactly
    assert [ms.anchors(9, 2, r) for r in (1, 2, 3)] == [[0, 5, 9], [0, 7, 9], [0, 8, 9]]
    assert ms.anchors(9, 4, 3) == [0, 5, 7, 8, 9] and ms.anchors(9, 4, 1.0) == ms.anchors(9, 4)
    assert all(ms.anchors(n, m, 1) == ms.anchors(n, m) for n in range(1, 12) for m in range(1, n + 1))
    # kept strictly increasing where the formula would stack anchors at the end of the grid
    assert ms.anchors(3, 3, 7) == [0, 1, 2, 3] and ms.anchors(4, 3, 9) == [0, 2, 3, 4]
    for n in range(1, 12):
        for m in range(1, n + 1):
            for r in (1.5, 2, 3, 7):
                a = ms.anchors(n, m, r)
                assert a[0] == 0 and a[-1] == n and len(a) == m + 1 and all(x < y for x, y in zip(a, a[1:]))
    assert ms.segments(9, (1, 2), 3) == [(0, 8), (0, 9), (8, 9)]
    with pytest.raises(ValueError, match="anchor_rho 0.5 must be >= 1"):
        ms.anchors(9, 2, 0.5)
    torch.manual_seed(0)
    m = KDM2D(**SMALL, intervals=9, nfe_train=(1, 2), anchor_rho=3).eval()
    assert sorted(m.segment_ops) == ["0-8", "8-9"] and m.anchor_rho == 3.0
    assert ms.trained_indices(m) == [0, 8, 9] and ms.trained_indices(model2d()) == [0, 2, 5, 7, 9]
    x_T = torch.randn(7, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():          # NFE 2 re-anchors at grid index 8 (tau = 1/9)
        x8 = m.traj_decoder(m.segment_ops["0-8"](m.xT_encoder(x_T, 1.0)), 1 - 8 / 9)
        by_hand = m.decoder(m.segment_ops["8-9"](m.traj_encoder(x8, 1 - 8 / 9)), 0.0)
        assert torch.allclose(m.generate(x_T, 2), by_hand, atol=1e-6)
    cfg = KDM2DConfig(**SMALL, nfe_train=[1, 2], anchor_rho=3)
    assert KDM2D.from_config(cfg, intervals=9).anchor_rho == 3.0
    assert KDM2D.from_config(KDM2DConfig(**SMALL, nfe_train=[1, 2]), intervals=9).anchor_rho == 1.0


def model2d(intervals=9, nfe_train=(1, 2, 4), seed=0):
    torch.manual_seed(seed)
    return KDM2D(**SMALL, intervals=intervals, nfe_train=nfe_train).eval()


def test_a_one_step_model_is_the_paper_model():
    one = model2d(1, (1,))
    assert one.segment_ops is None and one.traj_encoder is None and one.nfe_train == (1,)
    torch.manual_seed(0)
    before = KDM2D(**SMALL)                                  # the class as it was: same parameters, same names
    assert list(one.state_dict()) == list(before.state_dict())
    multi = model2d(9, (1, 2, 4))
    assert sorted(multi.segment_ops) == ["0-2", "0-5", "2-5", "5-7", "5-9", "7-9"]
    assert multi.nfe_train == (1, 2, 4)
    # the one-step modules come first and are initialised as the one-step model's
    ms_state, one_state = multi.state_dict(), one.state_dict()
    assert all(torch.equal(ms_state[k], v) for k, v in one_state.items())


def test_rollout_shapes_determinism_and_the_one_step_path():
    m = model2d()
    x_T = torch.randn(33, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        one = m.decoder(m.koopman(m.xT_encoder(x_T, 1.0)), 0.0)              # D(C E(x_T, T), 0)
        assert torch.equal(m.generate(x_T, 1), one)
        assert torch.allclose(ms.rollout(m, x_T, 1), one, atol=1e-6)
        for nfe in (1, 2, 4):
            x0, path = ms.rollout(m, x_T, nfe, keep_path=True)
            assert x0.shape == (33, 2) and len(path) == nfe and torch.equal(path[-1], x0)
            assert torch.equal(m.generate(x_T, nfe), x0)                       # deterministic given x_T
            assert torch.allclose(m.generate(x_T[:5], nfe), x0[:5], atol=1e-6)  # no batch coupling
        assert not torch.allclose(m.generate(x_T, 2), m.generate(x_T, 1))
        # NFE 2 by hand: decode at the anchor's level, re-encode, advance
        z = m.segment_ops["0-5"](m.xT_encoder(x_T, 1.0))
        x5 = m.traj_decoder(z, 1 - 5 / 9)
        by_hand = m.decoder(m.segment_ops["5-9"](m.traj_encoder(x5, 1 - 5 / 9)), 0.0)
        assert torch.allclose(m.generate(x_T, 2), by_hand, atol=1e-6)
    with pytest.raises(ValueError, match="samples with NFE 1, 2, 4"):
        m.generate(x_T, 3)


def test_the_training_pass_of_a_one_step_model_is_the_paper_pass():
    m = model2d(1, (1,))
    x0, xT = torch.randn(16, 2), torch.randn(16, 2)
    paper = m(x0, xT, generator=torch.Generator().manual_seed(3))
    traj = ms.trajectory_forward(m, {0: xT, 1: x0}, generator=torch.Generator().manual_seed(3))
    for a, b in zip(traj.one_step, paper):                 # the same pass, the same noise draws
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)
    assert torch.equal(traj.one_step.z0, paper.z0) and torch.equal(traj.one_step.zT_noisy, paper.zT_noisy)
    assert traj.traj_z_push is None and traj.traj_rec is None
    a, b = ms.trajectory_losses(traj), kdm_losses(x0, paper)
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_the_training_pass_over_trajectories():
    m = model2d()
    b = torch.randn(12, 10, 2, generator=torch.Generator().manual_seed(2))
    states = {i: b[:, i] for i in (0, 2, 5, 7, 9)}
    out = ms.trajectory_forward(m, states, generator=torch.Generator().manual_seed(0), aux_rows=4)
    # teacher-anchored: the 6 segments of the NFE 2 and 4 schedules; self-anchored: (5, 9) of NFE 2 and
    # (2, 5), (5, 7), (7, 9) of NFE 4; each over the first 4 rows. Reconstructions at the 3 inner anchors.
    assert out.traj_z_push.shape == ((6 + 1 + 3) * 4, 8) and out.traj_z_target.shape == out.traj_z_push.shape
    assert out.traj_rec.shape == (3 * 4, 2) and torch.equal(out.traj_rec_target[:4], b[:4, 2])
    one = out.one_step
    assert one.z_push.shape == (12, 8) and one.x0_rec.shape == (12, 2) and one.x0_push.shape == (12, 2)
    terms = ms.trajectory_losses(out, use_pred_loss=False)
    assert torch.allclose(terms["total"], terms["rec"] + terms["lat"])
    assert torch.allclose(terms["lat"], torch.nn.functional.mse_loss(one.z_push, one.z0) + terms["traj_lat"])
    # the trajectory terms train the trajectory networks and segment operators only
    (terms["traj_lat"] + terms["traj_rec"]).backward()
    one_step = ("x0_encoder", "xT_encoder", "decoder", "koopman")
    for name, p in m.named_parameters():
        assert (p.grad is None) == name.startswith(one_step), name
    with pytest.raises(ValueError, match=r"grid states \[2, 7\] are missing"):
        ms.trajectory_forward(m, {0: b[:, 0], 5: b[:, 5], 9: b[:, 9]})


def test_the_output_terms_train_what_the_sampler_outputs():
    m = model2d()
    b = torch.randn(12, 10, 2, generator=torch.Generator().manual_seed(2))
    states = {i: b[:, i] for i in (0, 2, 5, 7, 9)}
    plain = ms.trajectory_forward(m, states, generator=torch.Generator().manual_seed(0), aux_rows=4)
    out = ms.trajectory_forward(m, states, generator=torch.Generator().manual_seed(0), aux_rows=4, output=True)
    assert plain.traj_out is None and torch.equal(out.traj_z_push, plain.traj_z_push)
    # every push decoded where it ends: ends 2, 5 (x2), 7, 9 (x2) teacher-anchored, 5, 7, 9 (x2) self-anchored
    assert out.traj_out.shape == ((6 + 1 + 3) * 4, 2) == out.traj_out_target.shape
    targets = out.traj_out_target.view(-1, 4, 2)
    assert [int(next(i for i in (2, 5, 7, 9) if torch.equal(t, b[:4, i]))) for t in targets] == \
        [2, 5, 5, 5, 7, 7, 9, 9, 9, 9]
    # pushes ending between are decoded by the trajectory decoder, those ending at x_0 by the one-step decoder
    with torch.no_grad():
        z5, z9 = out.traj_z_push[4:8], out.traj_z_push[16:20]      # teacher-anchored (0, 5) and (5, 9)
        assert torch.allclose(out.traj_out[4:8], m.traj_decoder(z5, torch.full((4,), m.time_T * 4 / 9)))
        assert torch.allclose(out.traj_out[24:28], m.decoder(z9, torch.zeros(4)))
    terms = ms.trajectory_losses(out, use_pred_loss=False)
    assert torch.allclose(terms["total"], terms["rec"] + terms["lat"] + terms["traj_out"])
    # the output terms reach the trajectory networks and segment operators, never the one-step networks (the
    # one-step decoder is a fixed function there), and leave every parameter trainable afterwards
    terms["traj_out"].backward()
    one_step = ("x0_encoder", "xT_encoder", "decoder", "koopman")
    for name, p in m.named_parameters():
        assert p.requires_grad, name
        assert (p.grad is None) == name.startswith(one_step), name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.named_parameters()
               if n.startswith("segment_ops.5-9"))


def test_the_one_step_networks_train_as_the_one_step_student(tmp_path):
    """Same initialisation, batches, noise and updates: after training, a multi-step student's one-step map is
    the one-step student's, to the bit, also when the trajectory terms train on every third step only
    (``trajectory_every``), where the trajectory networks end elsewhere."""
    from pipeline import presets
    from pipeline.pairs import importer
    from pipeline.training.train2d import train_student
    from safetensors.torch import load_file
    from storage_schemas import PairsImportConfig
    arr = np.random.default_rng(0).normal(size=(5, 300, 2)).astype(np.float32)
    np.save(tmp_path / "t.npy", arr)
    importer.import_pairs(str(tmp_path / "t.npy"), PairsImportConfig(holdout_fraction=0.2, chunk_size=100,
                                                                     snapshots="all"), str(tmp_path / "p"))
    one = presets.load("student", "smoke", sets=["train.steps=12"])
    multi = presets.load("student", "smoke", sets=["train.steps=12", "model.nfe_train=[1,2,4]",
                                                   "model.trajectory_rows=32"])
    sparse = presets.load("student", "smoke", sets=["train.steps=12", "model.nfe_train=[1,2,4]",
                                                    "model.trajectory_rows=32", "model.trajectory_every=3"])
    weights = {}
    for name, cfg in (("one", one), ("multi", multi), ("sparse", sparse)):
        train_student(str(tmp_path / "p"), cfg, str(tmp_path / name), progress=False)
        weights[name] = load_file(str(tmp_path / name / "student.safetensors"))
    a, b, c = weights["one"], weights["multi"], weights["sparse"]
    assert set(a) < set(b) and any(k.startswith("traj_encoder") for k in b) and set(c) == set(b)
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    traj = [k for k in b if k not in a]
    assert all(torch.isfinite(c[k]).all() for k in traj) and any(not torch.equal(b[k], c[k]) for k in traj)


def test_the_image_student_uses_the_same_pieces():
    unet = dict(OFFICIAL_UNET, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.0)
    torch.manual_seed(0)
    m = KDMImage(img_resolution=8, unet=unet, intervals=4, nfe_train=(1, 2, 4), label_dim=3).eval()
    x_T, y = 80 * torch.randn(3, 3, 8, 8), torch.tensor([0, 2, 1])
    with torch.no_grad():
        yy = m.prepare_labels(y, 3, x_T)
        one = m.decoder(m.koopman(m.xT_encoder(x_T, 1.0, yy)) + m.control(yy), 0.0, yy)
        assert torch.equal(m.generate(x_T, y), one)
        z = m.segment_ops["0-2"](m.xT_encoder(x_T, 1.0, yy)) + m.control(yy)
        x2 = m.traj_decoder(z, 0.5, yy)
        two = m.decoder(m.segment_ops["2-4"](m.traj_encoder(x2, 0.5, yy)) + m.control(yy), 0.0, yy)
        assert torch.allclose(m.generate(x_T, y, 2), two, atol=1e-5)
        for nfe in (2, 4):
            out = m.generate(x_T, y, nfe)
            assert out.shape == (3, 3, 8, 8) and torch.equal(out, m.generate(x_T, y, nfe))
    # one operator per segment besides (0, 4): (0, 2), (2, 4) of NFE 2 and the four of NFE 4 (d = 64)
    assert sorted(m.segment_ops) == ["0-1", "0-2", "1-2", "2-3", "2-4", "3-4"]
    counts = m.parameter_counts()
    assert counts["segment_ops"] == 6 * (64 * 64 + 64)
    assert counts["traj_encoder"] == counts["xT_encoder"] and counts["traj_decoder"] == counts["decoder"]
    states = {i: torch.randn(3, 3, 8, 8) for i in range(5)}
    out = ms.trajectory_forward(m.train(), states, labels=yy, generator=torch.Generator().manual_seed(0), output=True)
    assert out.traj_out.shape == out.traj_out_target.shape and out.traj_out.shape[1:] == (3, 8, 8)
    ms.trajectory_losses(out)["traj_out"].backward()
    assert all(p.grad is None for n, p in m.named_parameters() if n.startswith(("decoder", "xT_encoder", "x0_encoder")))
    assert all(p.requires_grad for p in m.parameters())
    ms.trajectory_losses(ms.trajectory_forward(m, states, labels=yy, generator=torch.Generator().manual_seed(0)))[
        "total"].backward()
    from storage_schemas.kdm_image import KDMImageConfig
    late = KDMImage(img_resolution=8, unet=unet, intervals=4, nfe_train=(1, 2), anchor_rho=3)
    assert sorted(late.segment_ops) == ["0-3", "3-4"] and late.anchor_rho == 3.0
    assert KDMImageConfig(nfe_train=[1, 2], anchor_rho=3).anchor_rho == 3.0
    with pytest.raises(ValidationError, match="anchor_rho is a setting of multi-step students"):
        KDMImageConfig(anchor_rho=3)


@pytest.mark.parametrize("image", [False, True], ids=["2d", "image"])
def test_the_training_pass_and_rollout_name_their_networks_and_take_given_noise(image, monkeypatch):
    """Every network call of the training pass and the sampler names its network from the grid index (no
    device value read on the host, so the pass can be captured as a CUDA graph), and noise drawn by the caller
    in the pass's order gives the pass's own draws exactly."""
    if image:
        unet = dict(OFFICIAL_UNET, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                    dropout=0.0)
        torch.manual_seed(0)
        m, shape = KDMImage(img_resolution=8, unet=unet, intervals=4, nfe_train=(1, 2, 4), anchor_rho=2), (3, 8, 8)
    else:
        torch.manual_seed(0)
        m, shape = KDM2D(**SMALL, intervals=4, nfe_train=(1, 2, 4)), (2,)
    real, calls = ms.level, []

    def named_only(model, net):
        assert net is not None, "a network chosen by reading tau"
        calls.append(net)
        return real(model, net)
    monkeypatch.setattr(ms, "level", named_only)
    states = {i: torch.randn(5, *shape) for i in range(5)}
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    drawn = ms.trajectory_forward(m, states, generator=ga, traj_generator=gb, aux_rows=2, output=True)
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    eps = (torch.randn(5, m.latent_dim, generator=ga), torch.randn(5, m.latent_dim, generator=ga))
    assert ms.trajectory_noise_shape(m, 5, 2) == (2 * 3, m.latent_dim)     # inner anchors of NFE 2 and 4: 3
    given = ms.trajectory_forward(m, states, aux_rows=2, output=True, eps=eps,
                                  traj_eps=torch.randn(ms.trajectory_noise_shape(m, 5, 2), generator=gb))
    for a, b in zip(drawn, given):
        if torch.is_tensor(a):
            assert torch.equal(a, b)
    assert torch.equal(drawn.one_step.x0_push, given.one_step.x0_push)
    for nfe in (1, 2, 4):
        assert ms.rollout(m.eval(), states[0], nfe).shape == (5, *shape)
    assert set(calls) == {"x_T", "x_0", "trajectory"}
    assert ms.trajectory_noise_shape(KDM2D(**SMALL), 5) is None
    with pytest.raises(ValueError, match="no network 'trajectory' in this student"):
        real(KDM2D(**SMALL), "trajectory")
    assert ms.decoder_of(m, "trajectory") is m.traj_decoder and ms.encoder_of(m, "x_T") is m.xT_encoder
    with pytest.raises(ValueError, match="no decoder at x_T"):
        m.decode_state(states[0], torch.full((5,), m.time_T), net="x_T")


def test_config_fields_keep_one_step_versions():
    assert "nfe_train" not in KDM2DConfig().model_dump() and "trajectory_rows" not in KDM2DConfig().model_dump()
    assert KDM2DConfig(nfe_train=[1, 2], trajectory_rows=64).model_dump()["nfe_train"] == (1, 2)
    for bad in ([2], [1, 1], [2, 1], []):
        with pytest.raises(ValidationError, match="nfe_train"):
            KDM2DConfig(nfe_train=bad)
    with pytest.raises(ValidationError, match="trajectory_rows"):
        KDM2DConfig(trajectory_rows=64)
    # each multi-step setting: left out of the dump while unset, kept when set, refused without nfe_train
    for name, value, kept, bad in (("trajectory_output", True, True, None), ("anchor_rho", 2, 2.0, 0.5),
                                   ("trajectory_every", 4, 4, 0)):
        assert name not in KDM2DConfig(nfe_train=[1, 2]).model_dump()
        assert KDM2DConfig(nfe_train=[1, 2], **{name: value}).model_dump()[name] == kept
        with pytest.raises(ValidationError, match=f"{name} is a setting of multi-step students"):
            KDM2DConfig(**{name: value})
        if bad is not None:
            with pytest.raises(ValidationError, match=name):
                KDM2DConfig(nfe_train=[1, 2], **{name: bad})
    from storage_schemas.multistep import trains_trajectory
    assert [s for s in range(9) if trains_trajectory(4, s)] == [3, 7]
    assert all(trains_trajectory(None, s) and trains_trajectory(1, s) for s in range(5))


# --- the 2-D pipeline ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A tiny teacher, pairs with 3 snapshots (euler, 4 steps: t = 1/4, 1/2, 3/4), a multi-step student."""
    root = tmp_path_factory.mktemp("multistep")
    p = {k: root / k for k in ("teacher", "pairs", "student", "one")}
    assert main(["teacher", "train", "--preset", "smoke", "--set", "steps=20", "--out", str(p["teacher"]), "-q"]) == 0
    assert main(["pairs", "generate", "--teacher", str(p["teacher"]), "--seeds", "0-399", "--heldout-seeds",
                 "400-519", "--method", "euler", "--steps", "4", "--snapshots", "3", "--chunk-size", "200",
                 "--out", str(p["pairs"]), "-q"]) == 0
    assert main(["train", "--pairs", str(p["pairs"]), "--preset", "smoke", "--set", "model.nfe_train=[1,2,4]",
                 "--set", "model.trajectory_rows=64", "--set", "train.steps=30", "--out", str(p["student"]), "-q"]) == 0
    return p


def test_train_samples_and_resamples_at_every_nfe(chain, capsys, tmp_path):
    m = json.loads((chain["student"] / "manifest.json").read_text())
    assert m["model"]["nfe_train"] == [1, 2, 4] and m["snapshots"]["levels"] == [0.25, 0.5, 0.75]
    outs = {}
    for nfe in (1, 2, 4):
        assert main(["sample", "--student", str(chain["student"]), "--num", "50", "--seed", "3", "--nfe", str(nfe),
                     "--out", str(tmp_path / f"x{nfe}.npy")]) == 0
        outs[nfe] = np.load(tmp_path / f"x{nfe}.npy")
        assert outs[nfe].shape == (50, 2) and np.isfinite(outs[nfe]).all()
    assert f"{'4-NFE'} samples" in capsys.readouterr().out
    assert not np.array_equal(outs[1], outs[2])
    from pipeline.evaluation.sample import sample
    again, _ = sample(str(chain["student"]), num=50, seed=3, nfe=2)
    assert np.array_equal(again, outs[2])
    assert main(["sample", "--student", str(chain["student"]), "--num", "5", "--seed", "0", "--nfe", "3",
                 "--out", str(tmp_path / "x3.npy")]) != 0
    assert "NFE 3" in capsys.readouterr().err and not (tmp_path / "x3.npy").exists()


def test_a_student_with_late_anchors_trains_records_and_samples_on_them(chain, tmp_path):
    out = tmp_path / "late"
    assert main(["train", "--pairs", str(chain["pairs"]), "--preset", "smoke", "--set", "model.nfe_train=[1,2]",
                 "--set", "model.anchor_rho=3", "--set", "train.steps=5", "--out", str(out), "-q"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["anchor_rho"] == 3.0
    from pipeline.evaluation.sample import load_student, sample
    model, _ = load_student(str(out))
    assert sorted(model.segment_ops) == ["0-3", "3-4"]      # grid of 4 intervals: the anchor at 3, not 2
    x2, _ = sample(str(out), num=20, seed=1, nfe=2)
    assert x2.shape == (20, 2) and np.isfinite(x2).all()


def test_a_one_step_store_cannot_train_a_multi_step_student(chain, tmp_path):
    from pipeline import presets
    from pipeline.pairs import importer
    from pipeline.training.train2d import train_student
    from storage_schemas import PairsImportConfig
    arr = np.random.default_rng(0).normal(size=(2, 100, 2)).astype(np.float32)
    np.save(tmp_path / "t.npy", arr)
    importer.import_pairs(str(tmp_path / "t.npy"), PairsImportConfig(holdout_fraction=0.2, chunk_size=50),
                          str(tmp_path / "p"))
    cfg = presets.load("student", "smoke", sets=["model.nfe_train=[1,2]"])
    with pytest.raises(KDMError, match="keeps no trajectory snapshots"):
        train_student(str(tmp_path / "p"), cfg, str(tmp_path / "s"), progress=False)


def test_evaluation_reports_every_metric_per_nfe_and_the_teacher_cut_short(chain, tmp_path):
    from pipeline.evaluation import evaluate2d
    from storage_schemas import Eval2DConfig
    cfg = Eval2DConfig(num_samples=100, swd_projections=16, teacher_nfe=(1, 2, 4, 8))
    rep = evaluate2d.evaluate_student(str(chain["student"]), str(chain["pairs"]), cfg, str(tmp_path),
                                      teacher=str(chain["teacher"]))
    assert [(p.model, p.nfe) for p in rep.frontier] == [("student", 1), ("student", 2), ("student", 4),
                                                        ("teacher", 1), ("teacher", 2), ("teacher", 4), ("teacher", 8)]
    assert [p.sampler.describe() for p in rep.frontier if p.model == "teacher"] == \
        ["euler 1 step (1 NFE)", "euler 2 steps (2 NFE)", "euler 4 steps (4 NFE)", "euler 8 steps (8 NFE)"]
    assert rep.student_at(1) == rep.student and rep.teacher_nfe == 4
    # the teacher's own sampler at its pairs' NFE reproduces its x_0: pair MSE 0 against the held-out x_0
    assert rep.frontier[5].metrics.pair_mse < 1e-10 and rep.frontier[3].metrics.pair_mse > 0
    rows = evaluate2d.metrics_table(rep)
    assert [r["model"] for r in rows] == ["student (1 NFE)", "student (2 NFE)", "student (4 NFE)", "teacher x_0",
                                          "teacher, euler 1 step (1 NFE)", "teacher, euler 2 steps (2 NFE)",
                                          "teacher, euler 4 steps (4 NFE)", "teacher, euler 8 steps (8 NFE)"]
    assert [r["nfe"] for r in rows] == [1, 2, 4, 4, 1, 2, 4, 8] and all(r["n"] == 100 for r in rows)
    assert rows[1]["swd"] == round(rep.student_at(2).swd, 4)
    assert set(rep.plots) >= {"frontier", "samples_multistep"}
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = EvaluationReport.model_validate(json.loads((tmp_path / "report.json").read_text()))
    assert again.frontier == rep.frontier
    with pytest.raises(KDMError, match="needs the teacher network"):
        evaluate2d.evaluate_student(str(chain["student"]), str(chain["pairs"]), cfg, str(tmp_path / "x"))
    with pytest.raises(KDMError, match="NFE 3"):
        evaluate2d.evaluate_student(str(chain["student"]), str(chain["pairs"]), Eval2DConfig(num_samples=50, nfe=(3,)),
                                    str(tmp_path / "y"))
