"""Choice of torch's scaled-dot-product-attention backend for a model call.

torch's SDPA backend switches (``torch.nn.attention.sdpa_kernel``) are process-wide, not per thread. So that
concurrent ``generate`` calls never leave them changed, :func:`sdpa_context` sets them when the first call
that asks for a policy enters and restores what it found when the last one leaves (a reference count); a
call arriving while another policy is active runs under that one (the result is the same attention up to
kernel rounding). Between ralu calls the switches are exactly as the user left them.
"""
from __future__ import annotations

import contextlib

import torch

from .options import ATTN_BACKENDS
from .scoped import SharedSetting

_SDPA = SharedSetting()


def _policy(name: str, device: torch.device):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "auto":
        major = torch.cuda.get_device_capability(device)[0]
        order = ([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION] if major >= 9 else
                 [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION])
        return sdpa_kernel(order + [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True)
    single = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel([single])


@contextlib.contextmanager
def sdpa_context(name: str, device: torch.device | str):
    """Run the block under SDPA backend policy ``name``. ``auto``: cuDNN first on Hopper (sm90+; 2x faster than
    flash at FLUX's shape), flash first on other GPUs, torch's default on CPU. ``default``: torch's choice.
    ``cudnn`` / ``flash`` / ``efficient`` / ``math``: that backend only (an error where it cannot run)."""
    if name not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend={name!r} is not allowed; choose one of {ATTN_BACKENDS}")
    dev = torch.device(device)
    if name == "default" or (name == "auto" and dev.type != "cuda"):
        yield
        return
    with _SDPA(lambda: _policy(name, dev)):
        yield
