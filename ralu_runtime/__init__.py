"""ralu_runtime: Region-Adaptive Latent Upsampling (RALU) for diffusion transformers.

``generate(pipe, prompt, speedup="7x")`` runs RALU on a diffusers FLUX or SD3 pipeline; ``speedup=None``
runs the ordinary full-resolution sampler for comparison.
"""
from .api import RaluOutput, generate, load_pipeline
from .schedule import RaluSchedule, get_preset, solve_nt_matching

__all__ = ["RaluOutput", "RaluSchedule", "generate", "get_preset", "load_pipeline", "solve_nt_matching"]
