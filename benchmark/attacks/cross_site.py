"""The cross-site constraint (C2-C3) of mode ``jacobian``: the null space of the defended readouts' Jacobian.

``delta`` [n, p, d] added at the attacked site reaches the defended readouts of every later site through the
network. Flatten each example's ``delta`` to a vector of ``p * d`` entries and let ``J`` be the Jacobian of that
example's later-site readouts (encoder pre-activations of the defended features, at every editable position,
read before the defense acts there) with respect to it, at the defended point ``delta = 0``. A ``delta`` in the
null space of ``J`` leaves those readouts unchanged *to first order*; the basis is computed once per example
and reused for every step, so the curvature of the network between the sites is not accounted for (the
record's ``jacobian_residual_drift`` reports what the basis leaves of the first-order drift, and the
attack's ``drift_rel`` what is left in total).

``J``'s row space is spanned by vector-Jacobian products ``J^T g``. The exact Jacobian takes one backward pass
per readout row (site, position, feature), every example of the batch at once; the randomized estimate takes
one per random Gaussian vector ``g`` over the readouts (a randomized range finder on ``J^T``, without power
iterations). With fewer probes than the Jacobian's rank it captures only part of the row space (on a flat
spectrum about ``probes / rank`` of it), and the residual metric shows how much is left. Either set of vectors is
restricted to the attacked positions, stripped of the per-position C1 directions (which the attacker removes
exactly and separately) and orthonormalized per example (SVD in float64); directions with singular value below
``RTOL`` times the largest are dropped. Memory: the vectors take ``R * n * p * d`` floats and the basis
``n * p * d * r``, for R readout rows or probes and rank r (lower ``batch_size`` for long prompts).

The residual metric uses the exact Jacobian through Jacobian-vector products, ``J u = d<J^T g, u>/dg`` (double
backward), so it costs two backward passes per random direction whatever the number of rows.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

RTOL = 1e-6  # relative singular value below which a direction of the row space is numerically zero


def first_row_position(slot_mask: Tensor) -> int:
    """First position any example may change; readouts before it do not depend on ``delta`` (causality)."""
    attacked = slot_mask.bool().any(0).nonzero()
    return int(attacked[0]) if attacked.numel() else slot_mask.shape[1]


def rows_per_example(reads: dict[int, Tensor], row_mask: Tensor, first: int) -> Tensor:
    """[n] number of readout rows per example: defended features x editable positions from ``first`` on."""
    counted = row_mask[:, first:].sum(1)
    return counted * sum(r.shape[-1] for r in reads.values())


def exact_vjps(reads: dict[int, Tensor], delta: Tensor, row_mask: Tensor, first: int) -> Iterator[Tensor]:
    """``J^T e_row`` [n, p, d] for every readout row of the padded grid (one backward pass each, batched over
    examples). ``reads[L]`` is [n, p, k_L] with its graph to ``delta`` [n, p, d]; ``row_mask`` [n, p] bool marks
    the readout positions counted (rows it excludes come out zero)."""
    weights = row_mask.to(delta.dtype)
    for read in reads.values():
        for q in range(first, read.shape[1]):
            if not row_mask[:, q].any():
                continue
            for j in range(read.shape[2]):
                g = torch.zeros_like(read)
                g[:, q, j] = weights[:, q]
                yield torch.autograd.grad(read, delta, g, retain_graph=True)[0]


def random_vjps(reads: dict[int, Tensor], delta: Tensor, row_mask: Tensor, probes: int,
                generator: torch.Generator) -> Iterator[Tensor]:
    """``J^T g`` [n, p, d] for ``probes`` Gaussian vectors ``g`` over all readout rows at once (one backward pass
    each, batched over examples)."""
    weights = row_mask.to(delta.dtype)[..., None]
    sites = list(reads.values())
    for _ in range(probes):
        gs = [torch.randn(r.shape, generator=generator, dtype=r.dtype) * weights for r in sites]
        yield torch.autograd.grad(sites, delta, gs, retain_graph=True)[0]


def strip(vectors: Tensor, slot_mask: Tensor, c1_basis: Tensor | None) -> Tensor:
    """``vectors`` [..., n, p, d] restricted to the attacked slots (``slot_mask`` [n, p]) and orthogonal, at each
    position, to the C1 directions (``c1_basis`` [d, c] orthonormal, or None)."""
    out = vectors * slot_mask[..., None]
    if c1_basis is not None:
        out = out - (out @ c1_basis) @ c1_basis.T
    return out


def row_space(vectors: Tensor, slot_mask: Tensor, c1_basis: Tensor | None) -> tuple[Tensor, Tensor]:
    """Orthonormal basis ``Q`` [n, p * d, r] of the span of ``vectors`` [R, n, p, d] per example, after
    :func:`strip`; and the rank of each example's basis [n] (columns past it are zero)."""
    n, p, d = vectors.shape[1:]
    stripped = strip(vectors, slot_mask, c1_basis).reshape(len(vectors), n, p * d)
    bases, ranks = [], []
    for i in range(n):  # one example at a time keeps the float64 copy small
        a = stripped[:, i].T.double()  # [p * d, R]
        if a.shape[1] == 0:
            bases.append(a.new_zeros(p * d, 0))
            ranks.append(0)
            continue
        u, s, _ = torch.linalg.svd(a, full_matrices=False)
        keep = s > RTOL * s[0] if s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
        bases.append(u[:, keep])
        ranks.append(int(keep.sum()))
    width = max(ranks, default=0)
    q = torch.zeros(n, p * d, width)
    for i, b in enumerate(bases):
        q[i, :, : b.shape[1]] = b.float()
    slots = slot_mask.bool()[..., None].expand(n, p, d).reshape(n, p * d, 1)
    return q * slots, torch.tensor(ranks)  # exact zeros off the attacked slots (the SVD leaves ~1e-25 there)


def project_out(delta: Tensor, basis: Tensor) -> Tensor:
    """``delta`` [n, p, d] minus its component in the span of ``basis`` [n, p * d, r] (orthonormal columns)."""
    flat = delta.reshape(delta.shape[0], -1)
    flat = flat - (basis @ (basis.transpose(1, 2) @ flat[..., None]))[..., 0]
    return flat.reshape(delta.shape)


def jvp_norms(reads: dict[int, Tensor], delta: Tensor, row_mask: Tensor, directions: Tensor) -> Tensor:
    """``||J u||`` per example [m, n] for each direction ``u`` in ``directions`` [m, n, p, d], with the exact
    Jacobian: ``J u`` is the gradient of ``<J^T g, u>`` with respect to ``g`` (double backward, two backward
    passes per direction whatever the number of readout rows). ``reads`` must come from a forward pass that is
    twice differentiable (see :func:`twice_differentiable`)."""
    sites = list(reads.values())
    gs = [torch.zeros_like(r, requires_grad=True) for r in sites]
    vjp = torch.autograd.grad(sites, delta, gs, retain_graph=True, create_graph=True)[0]  # J^T g, linear in g
    weights = row_mask.to(delta.dtype)[..., None]
    norms = []
    for u in directions:
        ju = torch.autograd.grad(vjp, gs, u, retain_graph=True)
        norms.append(sum((j * weights).pow(2).sum((1, 2)) for j in ju).sqrt())
    return torch.stack(norms)


def residual_drift(reads: dict[int, Tensor], delta: Tensor, row_mask: Tensor, project, probes: Tensor) -> Tensor:
    """Mean over ``probes`` [m, n, p, d] (random directions in the attacked slots) of ``||J P v|| / ||J v||`` per
    example [n]: what the projector ``project`` ([n, p, d] -> [n, p, d]) leaves of the first-order drift of the
    readouts. Examples with ``J v = 0`` (nothing to drift) give 0."""
    projected = torch.stack([project(v) for v in probes])
    before = jvp_norms(reads, delta, row_mask, probes)
    after = jvp_norms(reads, delta, row_mask, projected)
    ratio = torch.where(before > 0, after / before.clamp_min(1e-30), torch.zeros_like(before))
    return ratio.mean(0)


def twice_differentiable():
    """Context for a forward pass whose graph supports double backward (:func:`jvp_norms`): PyTorch's fused
    attention kernels have no second derivative, its math kernel has one. Numerically the same forward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])
