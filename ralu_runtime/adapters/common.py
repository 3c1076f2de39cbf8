"""Layer helpers shared by the FLUX-style adapters (FLUX.1, Chroma, FLUX.2): rotary embeddings as diffusers applies
them and q/k/v projections from the model's own layers or ralu's fused copies."""
from __future__ import annotations

import torch

QKV = ("to_q", "to_k", "to_v")
ADDED_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on ``x (B, S, H, D)`` with ``cos``/``sin`` of shape ``(S, D)`` or ``(B, S, D)``.

    Same arithmetic as diffusers' ``apply_rotary_emb(use_real=True, sequence_dim=1)`` (interleaved pairs).
    """
    if cos.ndim == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def projections(attn, x: torch.Tensor, names: tuple[str, ...], fused) -> tuple[torch.Tensor, ...]:
    """The projections of ``x`` by ``attn``'s Linear layers ``names`` (e.g. :data:`QKV`), or by their fused copy
    ``fused = (weight, bias)`` (ralu's own, :mod:`ralu_runtime.adapters.fused`) split in as many parts."""
    if fused is not None:
        return torch.nn.functional.linear(x, fused[0], fused[1]).chunk(len(names), dim=-1)
    return tuple(getattr(attn, n)(x) for n in names)


__all__ = ["ADDED_QKV", "QKV", "apply_rope", "projections"]
