"""Where k-means starts: greedy weighted k-means++ (on principal coordinates when the seeding
is large), weighted random points, and the one-to-one matching of equal-width models."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from neurofuse.grouping._workspace import _dists, _Workspace


def _sample(potential: Tensor, m: int, gen: torch.Generator) -> Tensor:
    """``(B, m)`` indices drawn with replacement, row ``b`` with probability ``∝ potential[b]``."""
    cum = potential.cumsum(1)
    u = torch.rand(cum.shape[0], m, generator=gen, device=cum.device, dtype=cum.dtype)
    idx = torch.searchsorted(cum, u * cum[:, -1:], right=True)
    return idx.clamp_(max=cum.shape[1] - 1)


#: k-means++ seeding measures distances in the points' top principal directions, this many at
#: most (``None``: in the full working coordinates, as before issue 13). Seeding only picks
#: starting points: Lloyd runs in the exact coordinates, so the grouping it converges to is
#: judged by the exact cost (``benchmarks/kmeans_seeding.py`` measures the difference).
SEED_DIMS: int | None = 64
#: ... when the seeding's distance work (``k`` steps x candidates x restarts x points x
#: dimensions) exceeds this; below it the exact coordinates cost little. Every suite of the
#: committed reports lies below it (the largest, the demo's two width-256 MLPs: 2.9e9), so
#: their results are those of the exact seeding.
SEED_PRINCIPAL_WORK = 4e9


def _seed_coordinates(ws: _Workspace, gen: torch.Generator, work: float) -> tuple[Tensor, Tensor]:
    """Coordinates (and squared norms) for the seeding's distances. For a large seeding
    (more than :data:`SEED_PRINCIPAL_WORK`): float32 projections on the top :data:`SEED_DIMS`
    principal directions, found by a randomized range finder (Halko et al. 2011, two power
    iterations) drawn from ``gen``, not the global RNG (``torch.svd_lowrank`` would use it).
    Otherwise the exact working coordinates."""
    r = SEED_DIMS
    if r is None or work <= SEED_PRINCIPAL_WORK or min(ws.mm.shape) <= 2 * r:
        return ws.mm, ws.sq  # exact: the working coordinates and dtype, as Lloyd uses them
    z = ws.mm.to(torch.float64)
    omega = torch.randn(z.shape[1], r + 8, generator=gen, device=gen.device, dtype=torch.float64)
    q = torch.linalg.qr(z @ omega.to(z.device)).Q
    for _ in range(2):
        q = torch.linalg.qr(z @ (z.T @ q)).Q
    ub, s, _ = torch.linalg.svd(q.T @ z, full_matrices=False)
    y = ((q @ ub[:, :r]) * s[:r]).to(torch.float32)
    return y, y.square().sum(1)


def _init_kmeanspp(ws: _Workspace, k: int, n_init: int, gen: torch.Generator) -> Tensor:
    """Greedy weighted k-means++ (Arthur & Vassilvitskii 2007), ``n_init`` seedings at once.

    The first centre is drawn ``∝ s_j``; each next one from ``2 + ln k`` candidates drawn
    ``∝ s_j D(z_j)^2`` (``D`` = distance to the nearest centre so far), keeping the candidate
    that lowers ``sum_j s_j D(z_j)^2`` most. The running minimum-distance vector makes a step
    cost ``O(n p)`` per candidate; distances are taken in float32 on at most
    :data:`SEED_DIMS` principal coordinates. When every point is covered (duplicates), untaken
    points are drawn uniformly so that ``k`` distinct points are always chosen.
    """
    n = ws.mm.shape[0]
    device = ws.mm.device
    trials = 2 + int(math.log(k))
    y, ysq = _seed_coordinates(ws, gen, float(k * trials * n_init * n * ws.mm.shape[1]))

    def dists(idx: Tensor) -> Tensor:
        return _dists(y[idx], ysq[idx], y, ysq).to(torch.float64)

    rows = torch.arange(n_init, device=device)
    chosen = torch.empty(n_init, k, dtype=torch.long, device=device)
    first = _sample(ws.w.expand(n_init, n), 1, gen).squeeze(1)
    chosen[:, 0] = first
    closest = dists(first)
    closest[rows, first] = 0.0
    taken = torch.zeros(n_init, n, dtype=torch.bool, device=device)
    taken[rows, first] = True
    for i in range(1, k):
        potential = ws.w * closest
        covered = potential.sum(1, keepdim=True) <= 0
        potential = torch.where(covered, (~taken).to(potential.dtype), potential)
        cand = _sample(potential, trials, gen)
        dist = dists(cand.flatten()).view(n_init, trials, n)
        dist = torch.minimum(dist, closest[:, None, :])
        best = (dist * ws.w).sum(-1).argmin(1)
        pick = cand[rows, best]
        closest = dist[rows, best]
        closest[rows, pick] = 0.0
        taken[rows, pick] = True
        chosen[:, i] = pick
    return ws.acc[chosen]


def _init_random(ws: _Workspace, k: int, n_init: int, gen: torch.Generator) -> Tensor:
    """``k`` distinct points drawn without replacement ``∝ s_j`` (Gumbel top-k), per restart."""
    n = ws.mm.shape[0]
    u = torch.rand(n_init, n, generator=gen, device=ws.mm.device, dtype=torch.float64)
    keys = ws.w.log() - (-u.log()).log()
    return ws.acc[keys.topk(k, dim=1).indices]


_INITS: dict[str, Callable[[_Workspace, int, int, torch.Generator], Tensor]] = {
    "k-means++": _init_kmeanspp,
    "random": _init_random,
}


def matching_labels(points: Tensor, sizes: Sequence[int]) -> Tensor:
    """A partition of equal-width models' neurons into ``sizes[0]`` groups of one neuron per
    model: model 0's neurons found the groups, and each further model is matched one-to-one
    (Hungarian, squared distances) to the groups' current means. The k-means seed of
    equal-width fusion: one matching costs about as much as one Lloyd iteration's
    distances, where k-means++ seeding takes ``k`` sequential steps."""
    from scipy.optimize import linear_sum_assignment

    from neurofuse.grouping.hungarian import _pairwise_sq_dists

    sizes = [int(s) for s in sizes]
    if len(set(sizes)) != 1:
        raise ValueError(f"matching seeds need models of equal width; got sizes {sizes}")
    d = sizes[0]
    labels = torch.empty(sum(sizes), dtype=torch.long, device=points.device)
    labels[:d] = torch.arange(d, device=points.device)
    means = points[:d].to(torch.float64)
    for m in range(1, len(sizes)):
        block = points[m * d : (m + 1) * d]
        cost = _pairwise_sq_dists(block, means.to(block.dtype))
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        assigned = torch.empty(d, dtype=torch.long)
        assigned[torch.as_tensor(rows)] = torch.as_tensor(cols)
        labels[m * d : (m + 1) * d] = assigned.to(points.device)
        means = (means * m + _ordered(block, assigned).to(torch.float64)) / (m + 1)
    return labels


def _ordered(block: Tensor, assigned: Tensor) -> Tensor:
    """``block``'s rows placed at the groups they were assigned to."""
    out = torch.empty_like(block)
    out[assigned.to(block.device)] = block
    return out


__all__ = ["SEED_DIMS", "SEED_PRINCIPAL_WORK", "matching_labels"]
