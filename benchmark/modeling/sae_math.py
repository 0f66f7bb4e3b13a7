"""Encoder and decoder arithmetic on a subset of SAE latents, without running the whole SAE.

A clamp only needs the defended latents, so these helpers read the matching encoder columns. The encoder is
affine in the residual (``process_sae_in`` subtracts ``b_dec`` when the SAE applies it to its input), so the
directions C1 must avoid are the defended columns of ``W_enc``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def preacts(sae, h: Tensor, features: Tensor) -> Tensor:
    """Encoder pre-activations of ``features``: h [..., d] -> [..., n]."""
    sae_in = sae.process_sae_in(h)
    return sae_in @ sae.W_enc[:, features] + sae.b_enc[features]


def activations(sae, pre: Tensor, features: Tensor) -> Tensor:
    """The SAE's activation function on pre-activations of ``features`` (per latent, so JumpReLU or ReLU)."""
    arch = sae.cfg.architecture()
    if arch == "jumprelu":
        return pre * (pre > sae.threshold[features])
    if arch == "standard":
        return torch.relu(pre)
    raise ValueError(
        f"per-latent activation is undefined for '{arch}' SAEs (a latent's value depends on the others); "
        "use a JumpReLU or standard SAE"
    )


def encoder_directions(sae, features: Tensor) -> Tensor:
    """[n, d]: the encoder rows of ``features``; a residual change orthogonal to them leaves their pre-acts."""
    return sae.W_enc[:, features].T


def decoder_rows(sae, features: Tensor) -> Tensor:
    """[n, d]: decoder directions of ``features``."""
    return sae.W_dec[features]


def orthonormal_basis(directions: Tensor) -> Tensor:
    """[d, r]: an orthonormal basis of the span of the rows of ``directions`` [n, d] (r = its rank)."""
    q, r = torch.linalg.qr(directions.T.double())
    diag = r.diagonal().abs()
    keep = diag > diag.max() * 1e-10 if diag.numel() else diag.bool()
    return q[:, keep].to(directions.dtype)
