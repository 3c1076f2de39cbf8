"""Prompt embeddings shaped for the tiny random pipelines of :mod:`ralu_runtime.tiny` (text dim 32), shared
by the test modules: FLUX ``(b, 8, 32)`` + pooled ``(b, 32)``; SD3 the same plus pooled ``(b, 64)`` and the
negative pair for classifier-free guidance. Deterministic per ``seed``."""
import torch


def flux_embeds(b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(b, 8, 32, generator=g), "pooled_prompt_embeds": torch.randn(b, 32, generator=g)}


def sd3_embeds(b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(b, 8, 32, generator=g), "pooled_prompt_embeds": torch.randn(b, 64, generator=g),
            "negative_prompt_embeds": torch.randn(b, 8, 32, generator=g),
            "negative_pooled_prompt_embeds": torch.randn(b, 64, generator=g)}
