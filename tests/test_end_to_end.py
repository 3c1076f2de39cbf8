"""RALU end to end, checked by value: the three stages composed here from the public pieces (schedule sigmas, token
layout, the torch-reference transition, the adapter's model call, Euler steps written out) equal ``generate``.

Region choice and transition seeds are random draws of the sampler; they are taken from the ``generate`` call
(its returned mask and the seeds it drew), everything else is recomputed independently here.
"""
import pytest
import torch

import ralu_runtime.sampler as sampler_mod
from ralu_runtime import RaluSchedule, generate
from ralu_runtime.adapters import TokenGrid, get_adapter
from ralu_kernels.transition import stage_transition_reference
from ralu_runtime.layout import TokenLayout, grid_positions
from tiny_inputs import flux_embeds, sd3_embeds

SCHED = RaluSchedule(steps=(2, 3, 2), ends=(0.3, 0.55, 1.0), shifts=(2.0, 3.0, 4.0), z=5.0, ratio=0.3)


def _euler_stage(adapter, x, grid, k, cond):
    sig = SCHED.stage_sigmas(k)
    sigmas = torch.tensor(sig, dtype=torch.float32)
    timesteps = torch.tensor(sig[:-1] * 1000.0, dtype=torch.float32)
    for i in range(len(timesteps)):
        v = adapter.velocity(x, grid, timesteps[i], cond)
        x = (x.to(torch.float32) + (sigmas[i + 1] - sigmas[i]) * v).to(v.dtype)
    return x


def _transition(x, pos, tmap, k, seeds, noise):
    b = SCHED.boundary(k)
    return stage_transition_reference(x, pos, tmap.src_index, tmap.group, tmap.child, seeds, a=b.a, b=b.b, c=b.c,
                                      pos_scale=tmap.pos_scale, exact_noise=(noise == "exact"))


@pytest.mark.parametrize("family,noise", [("flux", "reference"), ("flux", "exact"), ("sd3", "reference")])
@torch.no_grad()
def test_ralu_equals_its_composition_from_public_pieces(family, noise, flux_pipe, sd3_pipe, monkeypatch):
    pipe, emb = (flux_pipe, flux_embeds(1)) if family == "flux" else (sd3_pipe, sd3_embeds(1))
    height, width = 96, 128
    seeds = []
    real = sampler_mod.draw_seeds
    monkeypatch.setattr(sampler_mod, "draw_seeds", lambda g, d: seeds.append(real(g, d)) or seeds[-1])
    guidance = 3.5 if family == "flux" else 5.0
    out = generate(pipe, **emb, height=height, width=width, speedup=SCHED, seed=3, guidance_scale=guidance,
                   output_type="latent", return_masks=True, progress=False, noise=noise, transition_impl="torch")
    assert len(seeds) == 2

    adapter = get_adapter(pipe)
    cond = adapter.encode_prompt(None, None, **emb, guidance_scale=guidance)
    noise_lat = adapter.prepare_noise(1, height, width, torch.Generator().manual_seed(3), torch.float32)
    coarse = (height // 32, width // 32)
    fine = (2 * coarse[0], 2 * coarse[1])
    x = adapter.pack(noise_lat[:, :, ::2, ::2].contiguous())
    pos = grid_positions(*coarse)[None].contiguous()
    x = _euler_stage(adapter, x, TokenGrid(pos, coarse, None, raster=True), 0, cond)
    selected = out.masks.reshape(1, -1).nonzero()[:, 1][None]  # the regions generate chose, raster order
    assert selected.shape[1] == int(coarse[0] * coarse[1] * SCHED.ratio)
    layout = TokenLayout(coarse, selected)
    x, pos = _transition(x, pos, layout.transition_12(), 0, seeds[0], noise)
    x = _euler_stage(adapter, x, TokenGrid(pos, coarse, layout.stage2_fine_mask()), 1, cond)
    x, pos = _transition(x, pos, layout.transition_23(), 1, seeds[1], noise)
    assert torch.equal(pos[0], grid_positions(*fine))  # stage 3 is the fine grid in raster order
    x = _euler_stage(adapter, x, TokenGrid(pos, fine, None, raster=True), 2, cond)
    ours = adapter.unpack(x, *noise_lat.shape[-2:])
    assert torch.equal(ours, out.images)
