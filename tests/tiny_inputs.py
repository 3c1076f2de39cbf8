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


def lora_state_dict(transformer, rank: int, seed: int, scale: float = 0.3) -> dict:
    """A random LoRA (diffusers/peft key names) on every attention's to_q / to_k / to_v of ``transformer``."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, mod in transformer.named_modules():
        if name.endswith(("attn.to_q", "attn.to_k", "attn.to_v")):
            base = getattr(mod, "base_layer", mod)
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, base.in_features, generator=g) * scale
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(base.out_features, rank, generator=g) * scale
    return sd
