"""Adapters: token packing, per-image RoPE for FLUX, per-token sin-cos embedding for SD3."""
import pytest
import torch

from ralu_runtime.adapters import TokenGrid, get_adapter
from ralu_runtime.layout import grid_positions


@pytest.fixture(scope="module")
def flux():
    from ralu_runtime.adapters.flux import FluxAdapter
    from ralu_runtime.tiny import build_tiny_flux_pipeline

    return FluxAdapter(build_tiny_flux_pipeline(seed=1))  # built directly: holds its pipeline


@pytest.fixture(scope="module")
def sd3():
    from ralu_runtime.adapters.sd3 import SD3Adapter
    from ralu_runtime.tiny import build_tiny_sd3_pipeline

    return SD3Adapter(build_tiny_sd3_pipeline(seed=2))


def test_get_adapter_holds_the_pipeline_weakly():
    from ralu_runtime.tiny import build_tiny_flux_pipeline

    adapter = get_adapter(build_tiny_flux_pipeline(seed=1))  # nothing else keeps the pipeline
    import gc

    gc.collect()
    with pytest.raises(RuntimeError, match="hold their pipeline weakly"):
        adapter.pipe


def test_pack_matches_diffusers_flux_packing(flux):
    from diffusers import FluxPipeline

    lat = torch.randn(2, 16, 8, 12)
    ours = flux.pack(lat)
    theirs = FluxPipeline._pack_latents(lat, 2, 16, 8, 12)
    assert torch.equal(ours, theirs)
    assert torch.equal(flux.unpack(ours, 8, 12), lat)


def test_flux_batched_rope_matches_diffusers():
    from diffusers.models.embeddings import apply_rotary_emb

    from ralu_runtime.adapters.flux import apply_rope

    x = torch.randn(2, 7, 3, 16)
    cos, sin = torch.randn(7, 16), torch.randn(7, 16)
    ref = apply_rotary_emb(x, (cos, sin), sequence_dim=1)
    assert torch.equal(apply_rope(x, cos, sin), ref)
    assert torch.equal(apply_rope(x, cos.expand(2, 7, 16), sin.expand(2, 7, 16)), ref)


def _flux_cond(flux, b, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return flux.encode_prompt(None, prompt_embeds=torch.randn(b, t, 32, generator=g),
                              pooled_prompt_embeds=torch.randn(b, 32, generator=g), guidance_scale=3.5)


@torch.no_grad()
def test_flux_per_image_positions_equal_separate_calls(flux):
    cond = _flux_cond(flux, 2)
    tokens = torch.randn(2, 10, 64)
    pos = torch.rand(2, 10, 2) * 4
    grid = TokenGrid(pos, (4, 4))
    both = flux.velocity(tokens, grid, torch.tensor(500.0), cond)
    for i in range(2):
        ci = type(cond)(1, {k: (v[i : i + 1] if v is not None else None) for k, v in cond.data.items()})
        one = flux.velocity(tokens[i : i + 1], TokenGrid(pos[i : i + 1], (4, 4)), torch.tensor(500.0), ci)
        torch.testing.assert_close(both[i : i + 1], one, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_flux_velocity_matches_transformer_forward(flux):
    cond = _flux_cond(flux, 1)
    tokens = torch.randn(1, 12, 64)
    pos = grid_positions(3, 4)
    ids = torch.cat([torch.zeros(12, 1), pos], dim=1)
    ref = flux.transformer(hidden_states=tokens, encoder_hidden_states=cond.data["embeds"],
                           pooled_projections=cond.data["pooled"], timestep=torch.tensor([0.25]),
                           img_ids=ids, txt_ids=torch.zeros(6, 3), guidance=cond.data["guidance"],
                           return_dict=False)[0]
    ours = flux.velocity(tokens, TokenGrid(pos[None], (3, 4), raster=True), torch.tensor(250.0), cond)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hw", [(4, 4), (3, 5), (8, 6)])
def test_sd3_sincos_at_integer_positions_equals_cropped_table(sd3, hw):
    pe = sd3.transformer.pos_embed
    table = pe.cropped_pos_embed(hw[0] * pe.patch_size, hw[1] * pe.patch_size)[0]
    ours = sd3.sincos_at(grid_positions(*hw)[None], hw)[0]
    torch.testing.assert_close(ours, table, rtol=0, atol=2e-6)


def _sincos_reference(row: float, col: float, grid_hw, pe) -> torch.Tensor:
    """SD3's 2-D sin-cos embedding written out in float64 at one real (row, col) of the centre crop of
    ``grid_hw``: first half from the column, second half from the row; each half is sin(p w) then cos(p w) with
    w_i = 10000^(-i / (D/4)), positions scaled by base_size / max_size / interpolation_scale."""
    dim = pe.pos_embed.shape[-1]
    m = pe.pos_embed_max_size
    scale = (m / pe.base_size) * pe.interpolation_scale
    top, left = (m - grid_hw[0]) // 2, (m - grid_hw[1]) // 2
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))

    def half(p):
        a = p * omega
        return torch.cat([torch.sin(a), torch.cos(a)])

    return torch.cat([half((col + left) / scale), half((row + top) / scale)]).float()


def test_sd3_sincos_half_positions_equal_the_formula(sd3):
    """A child at +0.5 gets the formula's value there (not an interpolation of the neighbours' table rows)."""
    pe = sd3.transformer.pos_embed
    points = [(1.0, 1.0), (1.5, 1.0), (2.0, 1.0), (0.5, 2.5), (3.5, 3.5)]
    emb = sd3.sincos_at(torch.tensor([points]), (4, 4))[0]
    for i, (r, c) in enumerate(points):
        torch.testing.assert_close(emb[i], _sincos_reference(r, c, (4, 4), pe), rtol=0, atol=1e-6)
    table = pe.cropped_pos_embed(4 * pe.patch_size, 4 * pe.patch_size)[0]  # the model's own table at integers
    torch.testing.assert_close(emb[0], table[1 * 4 + 1], rtol=0, atol=2e-6)
    torch.testing.assert_close(emb[2], table[2 * 4 + 1], rtol=0, atol=2e-6)
    assert (emb[1] - (emb[0] + emb[2]) / 2).abs().max() > 1e-3  # the formula, not a linear blend


@torch.no_grad()
def test_sd3_linear_patch_embedding_equals_native_conv(sd3):
    tokens = torch.randn(2, 12, 64)
    pos = grid_positions(3, 4).expand(2, -1, -1)
    native = sd3.embed_tokens(tokens, TokenGrid(pos, (3, 4), None, raster=True))
    linear = sd3.embed_tokens(tokens, TokenGrid(pos, (3, 4), None, raster=False))
    torch.testing.assert_close(linear, native, rtol=1e-5, atol=1e-5)


def test_unsupported_pipeline_class_is_rejected():
    class NotAPipeline:
        pass

    with pytest.raises(ValueError, match="unsupported model class 'NotAPipeline'"):
        get_adapter(NotAPipeline())


@pytest.mark.parametrize("h,w", [(100, 64), (64, 0), (48, 64)])
def test_size_must_be_multiple_of_coarse_block(flux, h, w):
    with pytest.raises(ValueError, match="multiple of 32"):
        flux.check_size(h, w)
