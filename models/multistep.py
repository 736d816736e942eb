"""Multi-step Koopman students: one model that samples with any number of network evaluations (NFE).

The paper distils the teacher's map x_T -> x_0 through one linear step in a learned latent space
(x_0 ~= D_psi(C_eta E_varphi(x_T))) and names full trajectories as future work (App. F). This module
extends it to the stored trajectory of the teacher, for every KDM model (2-D ``models.kdm2d.KDM2D``,
images ``models.kdm_image.KDMImage``): the models provide the three pieces below, this module holds the
grid, the training pass and the sampler, once.

Trajectory grid
    A pair store with K snapshots holds, per pair, states of one teacher trajectory
    s_0 = x_T, s_1, ..., s_K, s_n = x_0 (n = K + 1 intervals), in sampling order (noise to data).
    Grid index i reaches the networks as the time input tau_i = T (1 - i / n): tau_0 = T is the x_T
    encoder's input of the one-step model, tau_n = 0 the decoder's. (The store records what each
    snapshot is, e.g. the EDM noise level sigma or the flow-matching time t; the student needs only
    the order.) Without snapshots n = 1 and everything below is the paper's one-step model.

Observables and latent dynamics
    The augmented state (x, tau) of a time-dependent ODE is autonomous, so its Koopman operators form a
    semigroup in the time step. One operator C (the model's ``koopman``, affine as in the paper:
    C z = W z + b; a conditional image model adds its control term C_mu(y) at each interval) advances
    the latent by one grid interval and k intervals are its k-th power:
        z_i = E_varphi(s_i, tau_i)  (i < n),    z_n = E_phi(x_0, 0),
        z_j ~= C^(j - i) z_i,                    s_i ~= D_psi(z_i, tau_i).
    (model.encode_state, model.advance, model.decode_state.)

Sampling with m evaluations (1 <= m <= n)
    Anchors a_k = floor(k n / m + 1/2), k = 0..m (a_0 = 0, a_m = n; nested: the anchors of m = 2 are
    among those of m = 4 when n allows). With x^(0) = x_T:
        x^(k+1) = D_psi(C^(a_(k+1) - a_k) E(x^(k), tau_(a_k)), tau_(a_(k+1))),    x_0 = x^(m).
    m = 1 is the paper's one-step map, x_0 = D_psi(C^n E_varphi(x_T, T), 0): one encoder pass, one
    linear map (C^n) and one decoder pass. m > 1 re-anchors on its own decoded intermediate prediction
    (decode, re-encode, advance); each of the m rounds is one network evaluation.

Training (the paper's losses on every trained segment)
    The segments (i, j) are those of the sampling schedules of ``nfe_train`` (e.g. (1, 2, 4)), and with
    ``every_snapshot`` also each single interval (i, i + 1) of the grid, so that the latent path passes
    through every stored snapshot. With latent noise z~_i = z_i + sigma eps_i (std sigma, clean targets):
        L_lat  = mean over segments          || z_j - C^(j - i) z~_i ||^2
        L_pred = mean over segments          d(s_j, D_psi(C^(j - i) z~_i, tau_j))
        L_rec  = mean over states i > 0 used  d(s_i, D_psi(z~_i, tau_i))
    (x_T itself is never decoded, so it is not reconstructed.) With n = 1 and nfe_train = (1,) these
    are the paper's Eq. 5-7. ``trajectory_forward`` returns the tensors, the caller's distance d makes
    the losses (``trajectory_losses``: MSE, as the 2-D trainer).
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Optional, Protocol, Sequence

import torch

from .kdm2d import add_latent_noise


class TrajectoryModel(Protocol):
    """What a KDM model provides for multi-step training and sampling."""

    time_T: float
    latent_noise: float

    def encode_state(self, x: torch.Tensor, tau: torch.Tensor, labels=None) -> torch.Tensor:
        """Latent of states x at times tau (B,): the x_0 encoder where tau == 0, the x_T encoder elsewhere."""

    def decode_state(self, z: torch.Tensor, tau: torch.Tensor, labels=None) -> torch.Tensor:
        """States at times tau (B,) from latents z."""

    def advance(self, z: torch.Tensor, i: int, j: int, labels=None) -> torch.Tensor:
        """The latent at grid index j from the latent z at index i < j."""


# --- the grid ---------------------------------------------------------------------------------------

def anchors(intervals: int, nfe: int) -> list[int]:
    """Grid indices a_0 = 0 < ... < a_m = n of an m-evaluation sample: a_k = floor(k n / m + 1/2)."""
    if intervals < 1:
        raise ValueError(f"a trajectory grid has at least one interval, got {intervals}")
    if not 1 <= nfe <= intervals:
        raise ValueError(f"NFE {nfe} needs 1 <= NFE <= {intervals}, the intervals of the student's trajectory grid "
                         f"({intervals - 1} stored snapshot{'s' if intervals != 2 else ''} between x_T and x_0)")
    return [(2 * k * intervals + nfe) // (2 * nfe) for k in range(nfe + 1)]


def segments(intervals: int, nfe_train: Iterable[int], every_snapshot: bool = False) -> list[tuple[int, int]]:
    """The (start, end) grid segments trained: those of each NFE schedule in ``nfe_train`` (and, with
    ``every_snapshot``, each single interval), without repeats, ordered by (start, end)."""
    out = set()
    for m in nfe_train:
        a = anchors(intervals, m)
        out.update(zip(a[:-1], a[1:]))
    if every_snapshot:
        out.update((i, i + 1) for i in range(intervals))
    return sorted(out)


def times(intervals: int, time_T: float) -> list[float]:
    """tau_i = T (1 - i / n), i = 0..n: the networks' time input at each grid index."""
    return [time_T * (1.0 - i / intervals) for i in range(intervals + 1)]


# --- training ---------------------------------------------------------------------------------------

class TrajectoryForward(NamedTuple):
    """Rows are grouped by segment (``segments`` order) or by reconstructed state (``rec_index`` order),
    each group the whole batch in order.

    z_target: clean latent of each segment's end state; z_push: C^(j - i) z~_i; x_push: D(z_push, tau_j)
    (None unless decoded); push_target: s_j; x_rec: D(z~_i, tau_i); rec_target: s_i; spectral: the
    KDM-F penalty (None unless asked for)."""
    segments: list[tuple[int, int]]
    rec_index: list[int]
    z_target: torch.Tensor
    z_push: torch.Tensor
    x_push: Optional[torch.Tensor]
    push_target: torch.Tensor
    x_rec: torch.Tensor
    rec_target: torch.Tensor
    spectral: Optional[torch.Tensor] = None


def _rows(tau: float, batch: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((batch,), float(tau), dtype=like.dtype, device=like.device)


def trajectory_forward(model: TrajectoryModel, states: dict[int, torch.Tensor], intervals: int,
                       segs: Sequence[tuple[int, int]], labels=None, decode_push: bool = True,
                       generator: Optional[torch.Generator] = None, spectral: str = "none") -> TrajectoryForward:
    """One training pass over the segments ``segs`` of a batch of trajectories.

    ``states`` maps grid index -> (B, *sample_shape) states (0: x_T, ``intervals``: x_0); it must hold every
    index a segment starts or ends at. Every used state is encoded once (the x_T encoder in one call over
    all its levels), the latent noise of all of them is one draw from ``generator``, and each segment's
    push is the repeated Koopman step; the decoder runs once over [reconstructions; decoded pushes].
    """
    segs = list(segs)
    used = sorted({i for s in segs for i in s})
    missing = [i for i in used if i not in states]
    if missing:
        raise ValueError(f"trajectory_forward: grid states {missing} are missing (given {sorted(states)})")
    batch = states[used[0]].shape[0]
    tau = times(intervals, model.time_T)
    like = states[used[0]]

    def rep(t: Optional[torch.Tensor], k: int) -> Optional[torch.Tensor]:
        return None if t is None else torch.cat([t] * k)

    # x_T-encoder states in one call, x_0 in another; the latent noise of all of them in one draw
    noisy_idx = [i for i in used if i < intervals]
    parts = []
    if noisy_idx:
        parts.append(model.encode_state(torch.cat([states[i] for i in noisy_idx]),
                                        torch.cat([_rows(tau[i], batch, like) for i in noisy_idx]),
                                        rep(labels, len(noisy_idx))))
    if intervals in used:
        parts.append(model.encode_state(states[intervals], _rows(0.0, batch, like), labels))
    z_all = torch.cat(parts) if len(parts) > 1 else parts[0]
    zn_all = add_latent_noise(z_all, model.latent_noise, generator=generator)
    where = {i: slice(k * batch, (k + 1) * batch) for k, i in enumerate(used)}
    z_push = [model.advance(zn_all[where[i]], i, j, labels) for i, j in segs]
    z_target = [z_all[where[j]] for _, j in segs]
    z_push_t = torch.cat(z_push)
    rec_index = [i for i in used if i > 0]
    rec_in = torch.cat([zn_all[where[i]] for i in rec_index])
    rec_tau = torch.cat([_rows(tau[i], batch, like) for i in rec_index])
    n_rec = rec_in.shape[0]
    seg_lab, rec_lab = rep(labels, len(segs)), rep(labels, len(rec_index))
    if decode_push:
        push_tau = torch.cat([_rows(tau[j], batch, like) for _, j in segs])
        dec = model.decode_state(torch.cat([rec_in, z_push_t.to(rec_in.dtype)]), torch.cat([rec_tau, push_tau]),
                                 None if labels is None else torch.cat([rec_lab, seg_lab]))
        x_rec, x_push = dec[:n_rec], dec[n_rec:]
    else:
        x_rec, x_push = model.decode_state(rec_in, rec_tau, rec_lab), None
    spec = model.koopman.spectral_loss(spectral) if spectral != "none" else None
    return TrajectoryForward(segs, rec_index, torch.cat(z_target), z_push_t, x_push,
                             torch.cat([states[j] for _, j in segs]), x_rec,
                             torch.cat([states[i] for i in rec_index]), spec)


def trajectory_losses(out: TrajectoryForward, use_pred_loss: bool = True) -> dict[str, torch.Tensor]:
    """The MSE form of the losses (``models.losses.kdm_losses`` for a trajectory pass): rec, lat, pred
    (reported whenever decoded; in the total only with ``use_pred_loss``), spectral, total."""
    import torch.nn.functional as F
    losses = {"rec": F.mse_loss(out.x_rec, out.rec_target), "lat": F.mse_loss(out.z_push, out.z_target)}
    total = losses["rec"] + losses["lat"]
    if out.x_push is not None:
        losses["pred"] = F.mse_loss(out.x_push, out.push_target)
        if use_pred_loss:
            total = total + losses["pred"]
    elif use_pred_loss:
        raise ValueError("use_pred_loss=True needs the decoded pushes (decode_push=True)")
    if out.spectral is not None:
        losses["spectral"] = out.spectral
        total = total + out.spectral
    losses["total"] = total
    return losses


# --- sampling ---------------------------------------------------------------------------------------

@torch.no_grad()
def rollout(model: TrajectoryModel, x_T: torch.Tensor, nfe: int, intervals: int, labels=None,
            keep_path: bool = False):
    """x_0 from x_T in ``nfe`` network evaluations (the anchors of ``anchors(intervals, nfe)``); with
    ``keep_path`` also the list of the decoded states at every anchor after x_T. Deterministic given x_T."""
    a = anchors(intervals, nfe)
    tau = times(intervals, model.time_T)
    x, path = x_T, []
    for k in range(nfe):
        z = model.encode_state(x, _rows(tau[a[k]], x.shape[0], x), labels)
        z = model.advance(z, a[k], a[k + 1], labels)
        x = model.decode_state(z, _rows(tau[a[k + 1]], x.shape[0], x), labels)
        path.append(x)
    return (x, path) if keep_path else x
