"""ralu_runtime: Region-Adaptive Latent Upsampling (RALU) for diffusion transformers."""
