"""Multi-step Koopman students: one model that samples with 1, 2, 4, ... network evaluations (NFE).

The paper distils the teacher's map x_T -> x_0 through one linear step in a learned latent space,
x_0 ~= D_psi(C_eta E_varphi(x_T)), and names full trajectories as future work (App. F). This module
extends it to stored teacher trajectories for every KDM model (2-D ``models.kdm2d.KDM2D``, images
``models.kdm_image.KDMImage``): a model provides ``encode_state``, ``decode_state`` and ``advance``
(and calls ``set_trajectory`` when built); the grid, the training pass and the sampler live here, once.

Trajectory grid
    A pair store with K snapshots holds, per pair, states of one teacher trajectory in sampling order,
    s_0 = x_T, s_1, ..., s_K, s_n = x_0 (n = K + 1 intervals). Grid index i reaches the networks as the
    time input tau_i = T (1 - i / n): tau_0 = T is the x_T encoder's input of the one-step model, tau_n = 0
    the decoder's. (The store records what each snapshot is, e.g. the EDM noise level sigma or the
    flow-matching time t; the student needs only the order.)

Schedules
    An m-evaluation sample (1 <= m <= n) runs through the anchors
        a_k = floor(n (1 - (1 - k / m)^rho) + 1/2),   k = 0..m,
    kept strictly increasing (a_0 = 0, a_m = n); its segments are (a_k, a_(k+1)). rho = 1 (the default) spaces
    them evenly, a_k = floor(k n / m + 1/2) (the anchors of m = 2 are among those of m = 4 when n allows); rho > 1
    (a model config's ``anchor_rho``) moves the inner anchors toward x_0, as EDM's rho moves its steps toward low
    noise: the first round then goes most of the way and the later ones start from states with little noise left
    (n = 9, m = 2: a_1 = 5 at rho 1, 7 at rho 2, 8 at rho 3). The student is trained for the NFEs ``nfe_train``
    (e.g. (1, 2, 4)) and samples with any of them, on the anchors of its own rho.

Observables and latent dynamics
    The one-step model's networks observe the ends: z_0 = E_varphi(x_T, T), z_n = E_phi(x_0, 0), x_0 ~=
    D_psi(z_n, 0). A multi-step student adds a pair of time-conditioned trajectory networks for the states
    between, z_i = E_traj(s_i, tau_i) and s_i ~= D_traj(z_i, tau_i) (0 < i < n), and one affine Koopman
    operator per trained segment (i, j) (``advance``; a conditional image model adds its control term):
        z_j ~= C_ij z_i,        C_0n = C_eta, the paper's operator.
    (One operator and its powers, C_ij = C^(j - i), is the semigroup of an autonomous system; it trained
    markedly worse on the checkerboard trajectories than operators per segment, BENCHMARKS.md. So did
    sharing the one-step networks across levels: the intermediate levels then cost the one-step map
    accuracy.)

Sampling with m evaluations, x^(0) = x_T:
        x^(k+1) = D(C_(a_k a_(k+1)) E(x^(k), tau_(a_k)), tau_(a_(k+1))),    x_0 = x^(m)
    (E, D: the one-step networks at tau = T and 0, the trajectory networks between; these work at unit scale:
    the trainer scales the stored snapshots with ``snapshot_scales``, EDM's c_in(sigma) for images, and the
    decoded intermediate predictions are in those units already). m = 1 is exactly the
    paper's one-step map D_psi(C_eta E_varphi(x_T, T), 0); m > 1 re-anchors on its own decoded intermediate
    prediction (decode, re-encode, advance), one network evaluation per round.

Training (the paper's losses, on every trained segment)
    Latent noise z~ = z + sigma eps (std sigma) on every encoded teacher state, clean targets. The one-step
    terms over the whole batch are the paper's pass:
        L_lat = ||z_n - C_0n z~_0||^2,   L_rec = d(x_0, D_psi(z~_n, 0)),   L_pred = d(x_0, D_psi(C_0n z~_0, 0)).
    The trajectory terms, over the first ``aux_rows`` rows, for every trained schedule m > 1 and each of its
    segments (a_k, a_(k+1)), with the ends' latents z_0, z_n taken as constants (no gradient):
        teacher-anchored   ||z_(a_(k+1)) - C z~_(a_k)||^2
        self-anchored      ||z_(a_(k+1)) - C E_traj(x^_(a_k), tau_(a_k))||^2      (k >= 1)
        reconstruction     d(s_a, D_traj(z~_a, tau_a))  at every anchor 0 < a < n
    where x^_(a_k) is the student's own decoded prediction at a_k of the m-round rollout from x_T (an input,
    as when sampling: no gradient flows through it). The self-anchored segments train each later round on
    what it sees when sampling. The trajectory terms reach only the trajectory networks and the segment
    operators, and draw their latent noise from their own generator: the one-step networks are trained
    exactly as the one-step student's (same initialisation, batches, noise and updates), so NFE = 1 of a
    multi-step student equals the one-step student trained for the same steps. With nfe_train = (1,) this
    is the paper's pass (Eq. 5-7).

    With ``output`` (a model config's ``trajectory_output``), every segment's push is also decoded and
    compared with the teacher's state where it ends, in state space:
        output             d(s_(a_(k+1)), D(C z_(a_k), tau_(a_(k+1))))   (teacher- and self-anchored z_(a_k))
    where D is the trajectory decoder between and, for segments that end at x_0, the one-step decoder D_psi
    taken as a fixed function (its parameters get no gradient from this term): what the m-evaluation sampler
    outputs is then trained on directly, through the trajectory networks and the segment operators, and NFE = 1
    is still the one-step student's.

    The trainers may run the trajectory terms on every k-th step only (a model config's ``trajectory_every``):
    the other steps are the one-step pass alone, so the one-step networks still train exactly as the one-step
    student's, and the extra cost of the trajectory terms is divided by k.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, NamedTuple, Optional, Protocol, Sequence

import torch
from torch import nn


class TrajectoryModel(Protocol):
    """What a KDM model provides for multi-step training and sampling (``set_trajectory`` sets the rest)."""

    time_T: float
    latent_noise: float
    intervals: int
    nfe_train: tuple[int, ...]
    anchor_rho: float

    def encode_state(self, x: torch.Tensor, tau: torch.Tensor, labels=None, *, net: str) -> torch.Tensor:
        """Latent of states x at times tau (B,) by the networks ``net`` (``level``; ``grid_net`` of the states' grid
        index): the x_T encoder ('x_T', tau = T), the x_0 encoder ('x_0', 0), the trajectory encoder between
        ('trajectory', a multi-step student's)."""

    def decode_state(self, z: torch.Tensor, tau: torch.Tensor, labels=None, *, net: str) -> torch.Tensor:
        """States at times tau (B,) from latents z: the one-step decoder ('x_0'), the trajectory decoder between."""

    def advance(self, z: torch.Tensor, i: int, j: int, labels=None) -> torch.Tensor:
        """The latent at grid index j from the latent z at index i < j (the operator of segment (i, j))."""

    def __call__(self, x0: torch.Tensor, xT: torch.Tensor, *, decode_push: bool, generator, eps0, epsT,
                 spectral: str, **labels) -> "KDMForward":
        """The one-step training pass (the paper's Alg. 1, the model's ``forward``; ``labels=`` when conditional)."""


# --- the grid ---------------------------------------------------------------------------------------

def anchors(intervals: int, nfe: int, rho: float = 1.0) -> list[int]:
    """Grid indices a_0 = 0 < ... < a_m = n of an m-evaluation sample: a_k = floor(n (1 - (1 - k/m)^rho) + 1/2),
    kept strictly increasing; rho = 1: a_k = floor(k n / m + 1/2), evenly spaced."""
    if intervals < 1:
        raise ValueError(f"a trajectory grid has at least one interval, got {intervals}")
    if not 1 <= nfe <= intervals:
        raise ValueError(f"NFE {nfe} needs 1 <= NFE <= {intervals}, the intervals of the trajectory grid "
                         f"({intervals - 1} stored snapshot{'s' if intervals != 2 else ''} between x_T and x_0)")
    if rho < 1:
        raise ValueError(f"anchor_rho {rho} must be >= 1 (1: evenly spaced anchors)")
    if rho == 1:
        return [(2 * k * intervals + nfe) // (2 * nfe) for k in range(nfe + 1)]
    out = [0]
    for k in range(1, nfe):
        a = math.floor(intervals * (1.0 - (1.0 - k / nfe) ** rho) + 0.5)
        out.append(min(max(a, out[-1] + 1), intervals - (nfe - k)))
    return out + [intervals]


def segments(intervals: int, nfe_train: Sequence[int], rho: float = 1.0) -> list[tuple[int, int]]:
    """The (start, end) segments of the schedules of ``nfe_train`` (anchors of ``rho``), without repeats, ordered."""
    out = set()
    for m in nfe_train:
        a = anchors(intervals, m, rho)
        out.update(zip(a[:-1], a[1:]))
    return sorted(out)


def trained_indices(model) -> list[int]:
    """The grid indices the model's trained schedules pass through (0 and n included), sorted: the states a
    training batch needs (its own grid, NFEs and anchors)."""
    return sorted({i for m in model.nfe_train for i in anchors(model.intervals, m, model.anchor_rho)})


def trajectory_noise_shape(model, batch: int, aux_rows: Optional[int] = None) -> Optional[tuple[int, int]]:
    """Shape of the latent noise the trajectory terms draw in one training pass over ``batch`` rows (one row per
    trajectory row and inner anchor, ``trajectory_forward``'s order); None when there are none (no inner anchor)."""
    inner = trained_indices(model)[1:-1]
    if not inner:
        return None
    aux = batch if aux_rows is None else min(aux_rows, batch)
    return (len(inner) * aux, model.latent_dim)


def times(intervals: int, time_T: float) -> list[float]:
    """tau_i = T (1 - i / n), i = 0..n: the networks' time input at each grid index."""
    return [time_T * (1.0 - i / intervals) for i in range(intervals + 1)]


def snapshot_scales(axis: str, levels: Sequence[float], sigma_data: float = 0.5) -> list[float]:
    """Factors that bring stored snapshots to unit scale before the trajectory networks see them: EDM's
    c_in(sigma) = 1 / sqrt(sigma^2 + sigma_data^2) for EDM noise levels (a state at sigma = 20 has a spread of
    about 20), 1 for flow-matching times (states of unit scale). The trajectory networks work in these units
    throughout (teacher states are scaled, their own decoded predictions already are), so sampling needs them
    only in training."""
    if axis == "edm-sigma":
        return [1.0 / (float(v) ** 2 + sigma_data ** 2) ** 0.5 for v in levels]
    return [1.0 for _ in levels]


def set_trajectory(model: nn.Module, intervals: int, nfe_train: Sequence[int], make_operator: Callable[[], nn.Module],
                   make_encoder: Callable[[], nn.Module], make_decoder: Callable[[], nn.Module],
                   anchor_rho: float = 1.0) -> None:
    """Give ``model`` its grid (``intervals``), the NFEs it samples with (``nfe_train``) on the anchors of
    ``anchor_rho`` (``model.anchor_rho``), one operator per trained
    segment other than (0, n) (``segment_ops``) and the trajectory networks (``traj_encoder``, ``traj_decoder``,
    time-conditioned: called as (x, tau) / (z, tau)). A one-step model gets None for all three: its state dict is
    the paper model's. ``model.koopman`` stays the operator of (0, n). Call it after the one-step modules are
    built: their initialisation does not depend on it."""
    nfe_train = tuple(sorted(set(nfe_train) | {1}))      # the one-step map is always trained
    for m in nfe_train:
        anchors(intervals, m, anchor_rho)        # each NFE fits the grid
    model.intervals, model.nfe_train, model.anchor_rho = intervals, nfe_train, float(anchor_rho)
    extra = [s for s in segments(intervals, nfe_train, anchor_rho) if s != (0, intervals)]
    model.segment_ops = nn.ModuleDict({f"{i}-{j}": make_operator() for i, j in extra}) if extra else None
    model.traj_encoder = make_encoder() if extra else None
    model.traj_decoder = make_decoder() if extra else None


def level(model, net: str) -> str:
    """``net`` checked against the model's networks: 'x_T', 'x_0' or 'trajectory' (a multi-step student's). The
    callers name it from the states' grid index (``grid_net``) rather than reading their times tau: reading a device
    tensor's values stops the host until the device is there, and cannot be captured in a CUDA graph."""
    if net not in ("x_T", "x_0", "trajectory") or (net == "trajectory" and model.traj_encoder is None):
        raise ValueError(f"no network {net!r} in this student (x_T, x_0"
                         f"{', trajectory' if model.traj_encoder is not None else ''})")
    return net


def encoder_of(model, net: str) -> nn.Module:
    """The encoder of ``net`` (``level``): E_varphi ('x_T'), E_phi ('x_0'), E_traj ('trajectory')."""
    return {"x_T": model.xT_encoder, "x_0": model.x0_encoder, "trajectory": model.traj_encoder}[level(model, net)]


def decoder_of(model, net: str) -> nn.Module:
    """The decoder of ``net`` (``level``): D_psi ('x_0'), D_traj ('trajectory'). No state is decoded at x_T: the
    samplers start there."""
    if level(model, net) == "x_T":
        raise ValueError("no decoder at x_T: a student decodes at x_0 and, with trajectory networks, between")
    return model.decoder if net == "x_0" else model.traj_decoder


def grid_net(model, i: int) -> str:
    """The networks of grid index i: 'x_T' (i = 0), 'x_0' (i = n), 'trajectory' between."""
    return "x_T" if i == 0 else "x_0" if i == model.intervals else "trajectory"


def segment_operator(model, i: int, j: int) -> nn.Module:
    """The operator of segment (i, j): the model's ``koopman`` for (0, n), else its own."""
    if (i, j) == (0, model.intervals):
        return model.koopman
    ops = model.segment_ops
    if ops is None or f"{i}-{j}" not in ops:
        raise ValueError(f"the student has no operator for grid segment ({i}, {j}); it samples with NFE "
                         f"{', '.join(map(str, model.nfe_train))}")
    return ops[f"{i}-{j}"]


def check_nfe(model, nfe: int) -> None:
    if nfe not in model.nfe_train:
        raise ValueError(f"NFE {nfe}: the student samples with NFE {', '.join(map(str, model.nfe_train))} "
                         f"(the ones it was trained for)")


# --- training ---------------------------------------------------------------------------------------

class TrajectoryForward(NamedTuple):
    """The tensors of one trajectory pass; ``trajectory_losses`` turns them into losses.

    one_step: the paper's pass over the whole batch (``models.kdm2d.KDMForward``: z0, zT, their noisy copies,
    z_push, x0_rec, x0_push, spectral), x0 its target. The trajectory terms, over the first ``aux_rows`` rows and
    each group concatenated along the batch (None without inner anchors): traj_z_push / traj_z_target (teacher-
    and self-anchored segments), traj_rec / traj_rec_target (the anchors between x_T and x_0)."""
    one_step: "KDMForward"
    x0: torch.Tensor
    traj_z_push: Optional[torch.Tensor] = None
    traj_z_target: Optional[torch.Tensor] = None
    traj_rec: Optional[torch.Tensor] = None
    traj_rec_target: Optional[torch.Tensor] = None
    traj_out: Optional[torch.Tensor] = None
    traj_out_target: Optional[torch.Tensor] = None


def _rows(tau: float, batch: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((batch,), float(tau), dtype=like.dtype, device=like.device)


class frozen_parameters:
    """Within the block, the model's parameters do not require gradients (autograd records this per operation,
    so what was computed before is unaffected): a network applied here is a fixed function of its input, through
    which gradients still flow to that input."""

    def __init__(self, model: nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


def trajectory_forward(model: TrajectoryModel, states: dict[int, torch.Tensor], labels=None,
                       decode_push: bool = True, generator: Optional[torch.Generator] = None,
                       spectral: str = "none", aux_rows: Optional[int] = None,
                       traj_generator: Optional[torch.Generator] = None, output: bool = False,
                       eps: Optional[Sequence[torch.Tensor]] = None,
                       traj_eps: Optional[torch.Tensor] = None) -> TrajectoryForward:
    """One training pass over a batch of trajectories (the module docstring's terms).

    ``states`` maps grid index -> (B, *sample_shape): 0 (x_T), n (x_0) and every anchor of the trained
    schedules. ``aux_rows``: the trajectory terms use the first aux_rows rows (None: all). The one-step terms
    are the model's own training pass (``forward``: latent noise from ``generator``, x_0's then x_T's); the trajectory
    terms draw theirs from ``traj_generator`` (default: ``generator``). ``output``: also the output terms.
    ``eps`` (x_0's and x_T's) and ``traj_eps`` (of ``trajectory_noise_shape``): standard normal draws made by the
    caller, used instead of drawing (the image trainer draws them outside its captured CUDA graph). The pass
    reads no device value on the host: the networks of each state follow from its grid index.
    """
    from .kdm2d import add_latent_noise
    n = model.intervals
    batch = states[0].shape[0]
    aux = batch if aux_rows is None else min(aux_rows, batch)
    tau = times(n, model.time_T)
    like = states[0]
    lab_aux = None if labels is None else labels[:aux]
    schedules = [anchors(n, m, model.anchor_rho) for m in model.nfe_train if m > 1]
    inner = trained_indices(model)[1:-1]
    missing = [i for i in [0, n, *inner] if i not in states]
    if missing:
        raise ValueError(f"trajectory_forward: grid states {missing} are missing (given {sorted(states)})")

    # one-step terms: the model's own training pass (the paper's, whole batch)
    eps0, epsT = (None, None) if eps is None else eps
    one_step = model(states[n], states[0], decode_push=decode_push, generator=generator, eps0=eps0, epsT=epsT,
                     spectral=spectral, **({} if labels is None else {"labels": labels}))
    z0, zT, zT_noisy = one_step.z0, one_step.zT, one_step.zT_noisy
    if not inner:
        return TrajectoryForward(one_step, states[n])

    # trajectory terms (first aux rows): the ends' latents as constants, the anchors' teacher states encoded
    # in one call by the trajectory encoder, the latent noise of them all in one draw
    clean = {0: zT[:aux].detach(), n: z0[:aux].detach()}
    noisy = {0: zT_noisy[:aux].detach()}
    z_in = model.encode_state(torch.cat([states[i][:aux] for i in inner]),
                              torch.cat([_rows(tau[i], aux, like) for i in inner]),
                              None if labels is None else torch.cat([lab_aux] * len(inner)), net="trajectory")
    zn_in = add_latent_noise(z_in, model.latent_noise, traj_eps, generator=traj_generator or generator)
    for k, i in enumerate(inner):
        clean[i], noisy[i] = z_in[k * aux:(k + 1) * aux], zn_in[k * aux:(k + 1) * aux]
    teacher = {(i, j): model.advance(noisy[i], i, j, lab_aux)
               for i, j in segments(n, [m for m in model.nfe_train if m > 1], model.anchor_rho)}
    push, target, ends = list(teacher.values()), [clean[j] for _, j in teacher], [j for _, j in teacher]
    for a in schedules:      # the later rounds from the student's own decoded predictions
        z = teacher[(a[0], a[1])]
        for k in range(1, len(a) - 1):
            with torch.no_grad():
                x = model.decode_state(z, _rows(tau[a[k]], aux, like), lab_aux, net="trajectory")
            z = model.advance(model.encode_state(x, _rows(tau[a[k]], aux, like), lab_aux, net="trajectory"),
                              a[k], a[k + 1], lab_aux)
            push.append(z)
            target.append(clean[a[k + 1]])
            ends.append(a[k + 1])
    traj_rec = model.decode_state(zn_in, torch.cat([_rows(tau[i], aux, like) for i in inner]),
                                  None if labels is None else torch.cat([lab_aux] * len(inner)), net="trajectory")
    out, out_target = None, None
    if output:               # every push decoded where its segment ends (x_0: through the fixed one-step decoder)
        outs, targets = [], []
        for j in sorted(set(ends)):
            zs = [p for p, e in zip(push, ends) if e == j]
            lab = None if labels is None else torch.cat([lab_aux] * len(zs))
            with frozen_parameters(model) if j == n else contextlib.nullcontext():
                outs.append(model.decode_state(torch.cat(zs), _rows(tau[j], aux * len(zs), like), lab,
                                               net=grid_net(model, j)))
            targets.append(torch.cat([states[j][:aux]] * len(zs)))
        out, out_target = torch.cat(outs), torch.cat(targets)
    return TrajectoryForward(one_step, states[n], torch.cat(push), torch.cat(target), traj_rec,
                             torch.cat([states[i][:aux] for i in inner]), out, out_target)


def trajectory_terms(out: TrajectoryForward) -> dict[str, torch.Tensor]:
    """The trajectory terms alone, each an MSE in float32 (the image trainer's states are bf16 under autocast):
    traj_lat and traj_rec (with trajectory rows), traj_out (with the output terms). Every trainer adds
    traj_lat to its L_lat, traj_rec to its L_rec and all three to its total."""
    import torch.nn.functional as F
    terms = {}
    if out.traj_z_push is not None:
        terms["traj_lat"] = F.mse_loss(out.traj_z_push.float(), out.traj_z_target.float())
        terms["traj_rec"] = F.mse_loss(out.traj_rec.float(), out.traj_rec_target.float())
    if out.traj_out is not None:
        terms["traj_out"] = F.mse_loss(out.traj_out.float(), out.traj_out_target.float())
    return terms


def trajectory_losses(out: TrajectoryForward, use_pred_loss: bool = True) -> dict[str, torch.Tensor]:
    """The MSE form of the losses: ``models.losses.kdm_losses`` of the one-step pass, plus ``trajectory_terms``
    (reported alone as traj_lat / traj_rec / traj_out, added to lat, rec and the total)."""
    from .losses import kdm_losses
    losses = kdm_losses(out.x0, out.one_step, use_pred_loss)
    terms = trajectory_terms(out)
    for k in ("lat", "rec"):
        if f"traj_{k}" in terms:
            losses[k] = losses[k] + terms[f"traj_{k}"]
    for v in terms.values():
        losses["total"] = losses["total"] + v
    return {**losses, **terms}


# --- sampling ---------------------------------------------------------------------------------------

@torch.no_grad()
def rollout(model: TrajectoryModel, x_T: torch.Tensor, nfe: int, labels=None, keep_path: bool = False):
    """x_0 from x_T in ``nfe`` network evaluations (one of the model's ``nfe_train``); with ``keep_path`` also
    the list of the decoded states at every anchor after x_T. Deterministic given x_T."""
    check_nfe(model, nfe)
    a = anchors(model.intervals, nfe, model.anchor_rho)
    tau = times(model.intervals, model.time_T)
    x, path = x_T, []
    for k in range(nfe):
        z = model.encode_state(x, _rows(tau[a[k]], x.shape[0], x), labels, net=grid_net(model, a[k]))
        z = model.advance(z, a[k], a[k + 1], labels)
        x = model.decode_state(z, _rows(tau[a[k + 1]], x.shape[0], x), labels, net=grid_net(model, a[k + 1]))
        path.append(x)
    return (x, path) if keep_path else x
