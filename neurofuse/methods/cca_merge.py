"""CCA Merge (Horoi et al. 2024): align each model's hidden neurons to a reference model's by
canonical correlation analysis of their activations on the fusion set, then average.

Where Git Re-Basin and OTFusion match neurons one to one (or softly), CCA Merge maps a whole
space at once by the linear transformation between the two models' canonical bases. With the
neuron activations ``z_A`` (reference) and ``z_B`` of a space (centred, one row per neuron over
every sample and position) and their covariances ``S_AA``, ``S_BB``, ``S_AB`` (ridge ``reg``
times the mean variance added to the diagonal), the canonical directions are
``P_A = S_AA^{-1/2} U`` and ``P_B = S_BB^{-1/2} V`` with ``U S V^T`` the SVD of
``S_AA^{-1/2} S_AB S_BB^{-1/2}``; B's neurons expressed in A's basis are ``T z_B`` with
``T = P_A^{-T} P_B^T``. Model B's parameters that write the space (weight rows, biases,
normalisation parameters) are mapped by ``T``, those that read it (the next layers' input
columns) by ``T^{-T}``, and the aligned models are averaged (``weights``).

A permuted copy gives ``T`` the permutation itself, so it is recovered exactly. A general ``T``
does not commute with the nonlinearity (the paper's approximation) nor with a BatchNorm, whose
running variance is mapped as the variance of the mixed neurons without their covariances:
``reset_bn`` or ``repair`` re-estimate what that leaves off. Spaces that cannot be permuted (the input, the classes) are left alone; attention
heads would be mixed across heads, so transformer-like models are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from neurofuse.alignment import Space
from neurofuse.methods._activations import (
    Activations,
)
from neurofuse.methods._averaging import (
    State,
    alignment_setup,
    average_states,
    finish,
    write_state,
)
from neurofuse.methods._plan import is_incoming, map_axis
from neurofuse.methods.registry import Capabilities, FusionContext, register_method


@dataclass
class CCAMergeOptions:
    """Options of ``cca_merge``.

    Attributes:
        reference: index of the model the others are aligned to.
        reg: ridge added to each covariance's diagonal, relative to its mean diagonal (keeps
            dead or duplicate neurons from making the covariances singular).
        weights: model weights of the final average (default uniform).
        reset_bn: re-estimate BatchNorm running statistics on the fusion set after merging.
        repair: REPAIR (Jordan et al. 2022): rescale every hidden neuron so that its mean and
            standard deviation on the fusion set are the interpolation of the aligned base
            models' (after ``reset_bn`` if both).
    """

    reference: int = 0
    reg: float = 1e-4
    weights: list[float] | None = None
    reset_bn: bool = False
    repair: bool = False

    def __post_init__(self) -> None:
        if not self.reg > 0:
            raise ValueError(f"reg must be > 0, got {self.reg}")


def _inverse_sqrt(s: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh(s)
    return (vecs * vals.clamp_min(1e-300).rsqrt()) @ vecs.T


def cca_transform(za: Tensor, zb: Tensor, reg: float) -> Tensor:
    """``T`` (``(d, d)``, float64) with ``T z_B`` the neurons of B in A's canonical basis, from
    neuron rows ``za``, ``zb`` (``(d, N)``) of the same inputs."""
    za = za.to(torch.float64)
    zb = zb.to(torch.float64)
    za = za - za.mean(1, keepdim=True)
    zb = zb - zb.mean(1, keepdim=True)
    n = za.shape[1]
    return cca_from_covariances(za @ za.T / n, zb @ zb.T / n, za @ zb.T / n, reg)


def cca_from_covariances(saa: Tensor, sbb: Tensor, sab: Tensor, reg: float) -> Tensor:
    """:func:`cca_transform` from the covariances of A's and B's neurons and their cross
    covariance (what a fusion set too large to hold gives, summed over chunks)."""
    eye = torch.eye(saa.shape[0], dtype=torch.float64, device=saa.device)
    saa = saa + reg * max(float(saa.diagonal().mean()), 1e-12) * eye
    sbb = sbb + reg * max(float(sbb.diagonal().mean()), 1e-12) * eye
    ia, ib = _inverse_sqrt(saa), _inverse_sqrt(sbb)
    u, _, vt = torch.linalg.svd(ia @ sab @ ib)
    pa, pb = ia @ u, ib @ vt.T
    return torch.linalg.solve(pa.T, pb.T)  # P_A^{-T} P_B^T


def map_space_linear(state: State, space: Space, t: Tensor, reads: set[tuple[str, int]]) -> State:
    """``state`` with ``space``'s neurons mapped by ``t``: members in ``reads`` (input columns)
    by ``t^{-T}``, every other member by ``t``."""
    inv_t = torch.linalg.inv(t).T
    out = dict(state)
    for member in space.members:
        tensor = state[member.key]
        m = inv_t if (member.key, member.axis) in reads else t
        if member.key.endswith("running_var"):
            # the variance of sum_j t_ij z_j, neglecting the covariances: positive, and exact
            # for a permutation
            m = t * t
        mapped = map_axis(tensor.to(torch.float64), member.axis, m, member, space.size)
        out[member.key] = mapped.to(tensor.dtype)
    return out


@register_method(
    "cca_merge",
    "CCA Merge (Horoi et al. 2024): each hidden space mapped to the reference's by canonical "
    "correlation analysis of activations, then averaging",
    CCAMergeOptions,
    Capabilities(
        equal_widths=True,
        target="same",
        transformers=False,
        tied_weights=True,
        exact=True,
    ),
)
def cca_merge(ctx: FusionContext) -> nn.Module:
    opt: CCAMergeOptions = ctx.options
    ref, weights, states, spaces = alignment_setup(
        ctx, "cca_merge", opt.reference, opt.weights, equal_widths=True
    )
    gm = ctx.trace(ctx.models[ref])
    acts = Activations(ctx)
    aligned: list[State] = []
    correlations: dict[str, float] = {}
    for k, state in enumerate(states):
        if k == ref:
            aligned.append(state)
            continue
        for space, ref_space in zip(spaces[k], spaces[ref], strict=True):
            if space.fixed:
                continue
            # the covariances over the whole set (or summed over chunks of it)
            cov, count = acts.covariance([ref, k], [ref_space, space])
            d = ref_space.size
            caa, cbb, cab = cov[:d, :d], cov[d:, d:], cov[:d, d:]
            t = cca_from_covariances(caa / count, cbb / count, cab / count, opt.reg)
            # the cosine of (T z_B) and z_A, centred, from the same sums
            # <T z_B, z_A> = sum T * C_AB; |T z_B|^2 = sum (T C_BB) * T; |z_A|^2 = tr C_AA
            dot = float((t * cab).sum())
            tb = max(float(((t @ cbb) * t).sum()), 0.0) ** 0.5
            similarity = dot / max(tb * max(float(caa.trace()), 0.0) ** 0.5, 1e-8)
            reads = {(m.key, m.axis) for m in space.members if is_incoming(gm, m.key, m.axis)}
            state = map_space_linear(state, space, t, reads)
            if k == (1 if ref == 0 else 0):
                correlations[space.name] = similarity
        aligned.append(state)
    ctx.report["aligned_similarity"] = correlations
    fused = average_states(aligned, weights)
    fused_model = write_state(ctx.target, fused, "cca_merge")
    return finish(ctx, fused_model, opt.reset_bn, opt.repair, aligned, weights)
