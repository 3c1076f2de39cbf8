"""SD3 / SD3.5 adapter (StableDiffusion3Pipeline / SD3Transformer2DModel): patch embedding per token, sin-cos
position embedding evaluated at each token's own position, classifier-free guidance, skip-layer guidance.

Models: SD3 Medium (24 joint blocks), SD3.5 Large (38 joint blocks, RMSNorm on q/k) and SD3.5 Medium (MMDiT-X:
24 blocks, the first 13 with a second, image-only self-attention; q/k RMSNorm; a 384-cell position table). One
adapter serves them all; positions enter the model only through its patch embedding.

Positions: SD3 adds a fixed 2-D sin-cos table (centre-cropped to the current token grid) after its patch
embedding. Raster token sets (RALU stages 1 and 3, the baseline) go through the model's own ``pos_embed`` module.
Mixed sets (stage 2: coarse tokens and their children at +{0, 0.5}, per image) go through the patch embedding's
own conv applied to each token's patch (kernel = stride = patch: the same map, one token at a time) plus the
sin-cos formula evaluated at each token's (fractional) index on the coarse crop (:meth:`SD3Adapter.sincos_at`).

Execution modes (:mod:`ralu_runtime.execution`); the joint sequence is ``[image ; text]`` (streams :data:`IMAGE`,
:data:`TEXT`), and one transformer body (:meth:`SD3Adapter._forward`) serves every mode:

* one request (:class:`~ralu_runtime.execution.modes.Dense`, :meth:`SD3Adapter.velocity`): the joint blocks are
  called as the modules they are (:func:`sd3_block_call`). Why not ralu's block function: SD3's one-request path
  accepts any attention processor but IP-Adapter (custom or subclassed processors, fused q/k/v processors, the
  processor's own attention call), diffusers' stateless hook registries on the blocks (group offloading, layerwise
  casting) and torch hooks that replace a block's inputs or outputs; only the module call runs all of them, and it
  is diffusers' own computation (bitwise). :func:`sd3_joint_block` performs the same operations in the same order:
  with diffusers' ``JointAttnProcessor2_0`` its one-rank sharded result equals the module call bitwise
  (tests/test_modes_sd3.py), so the two paths cannot drift apart unnoticed.
* many requests packed into one call (:class:`~ralu_runtime.execution.packing.Packed`,
  :meth:`SD3Adapter.packed_velocity`) and one request sharded across ranks
  (:class:`~ralu_runtime.execution.sharding.Sharded`: context parallelism, when the running ``generate`` call has a
  sharding plan): :func:`sd3_joint_block` / :func:`sd3_attention`, ralu's one copy of ``JointTransformerBlock`` and
  ``JointAttnProcessor2_0`` written against the mode; SD3.5 Medium's second attention is image-only
  (``ex.attend(..., stream=IMAGE)``: each image's own tokens, on every rank's rows when sharded). These modes need
  diffusers' ``JointAttnProcessor2_0`` on every attention (packed calls fall back to per-call velocity otherwise;
  sharded calls are refused, :meth:`SD3Adapter.check_shardable`).

SD3 has no text mask: every text token is attended (no key mask in any mode).

Skip-layer guidance (SD3.5 Medium's recommended setting; diffusers' ``skip_guidance_layers`` and friends): set
``get_adapter(pipe).skip_layer_guidance = SkipLayerGuidance(layers=(7, 8, 9))``. It is applied inside
:meth:`SD3Adapter.velocity` by the timestep's place in the model's own (unshifted) time axis, so it works in every
RALU stage and in the sharded mode; see :class:`SkipLayerGuidance` for how that window relates to diffusers'
step-index window. A packed call inside its window runs per call (its extra skip-layer forward has another block
stack than the packed neighbours).

Refused before any work (:meth:`SD3Adapter.check_supported`): IP-Adapter attention processors (ralu passes no
image embeddings, so the adapter would be silently ignored); diffusers' stateful hooks on the transformer or its
blocks (``enable_cache`` and the like: their state follows the transformer's own forward, which ralu does not
call; group offloading and layerwise casting are stateless per call and allowed); skip-layer guidance naming
layers the model lacks, or with a dynamically shifted scheduler (no single shift defines its window).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..families import FAMILIES
from ..execution.modes import DENSE, Dense, Mode
from ..execution.packing import (HostSegments, Packed, PackedExecution, PackedSegments, can_pack, forward_override,
                                 has_hooks, pad_rows, split_calls, static_attention)
from ..execution.sharding import Sharded
from .base import (EAGER, STATELESS_HOOK_PREFIXES, BlockStack, Conditioning, DiTAdapter, ModelImpl, TokenGrid,
                   VelocityCall, call_with_hooks, check_velocity_calls, current_sharding, pipeline_mu)
from .common import ADDED_QKV, QKV, projections

IMAGE, TEXT = 0, 1  # SD3's streams, in the order of its joint sequence [image ; text]


# the attention processor sd3_attention reproduces (packed and sharded calls need it on every attention)
JOINT_PROCESSORS = ("JointAttnProcessor2_0",)
# JointAttnProcessor2_0 calls torch's SDPA itself, whatever attention backend diffusers has active (a model's
# set_attention_backend() makes its backend the process-wide default): sd3_attention names diffusers' "native"
# backend (torch's SDPA) so that it does the same
NATIVE = "native"


def sd3_block_call(block, hidden_states, encoder_hidden_states, temb, ex: Mode = DENSE):
    """One ``JointTransformerBlock`` called as the module it is (its processor and hooks run as usual): the one-request
    (Dense) path, see the module docstring. Returns ``(encoder_hidden_states or None, hidden_states)``; a function of
    its own so a backend can compile it without touching the user's module (``ex`` is unused: Dense only)."""
    return block(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb)


def _feed_forward(block, ff, x: torch.Tensor) -> torch.Tensor:
    """``ff(x)``, in chunks of the block's ``_chunk_size`` along its ``_chunk_dim`` when it has one (diffusers'
    ``_chunked_feed_forward``: equal chunks; the last one may be shorter here, so a sharded or packed token count need
    not be a multiple of the size; a packed call's dim 0 is 1: one chunk)."""
    if block._chunk_size is None:
        return ff(x)
    return torch.cat([ff(c) for c in x.split(block._chunk_size, dim=block._chunk_dim)], dim=block._chunk_dim)


def sd3_attention(attn, hidden_states, encoder_hidden_states, ex: Mode = DENSE):
    """diffusers' ``JointAttnProcessor2_0`` on ``attn`` (same operations, same order; the processor's ``(B, H, S,
    Dh)`` layout is ``(B, S, H, Dh)`` here: the same values), in mode ``ex``.

    With ``encoder_hidden_states`` (the text stream): attention over the joint sequence ``[image ; text]``; returns
    ``(image out, text out)``, text out None for ``attn.context_pre_only``. Without (SD3.5 Medium's ``attn2``):
    attention of the image stream alone (every image's own tokens); returns the image out."""
    query, key, value = projections(attn, hidden_states, QKV, None)
    head_dim = key.shape[-1] // attn.heads
    query = query.unflatten(-1, (attn.heads, head_dim))
    key = key.unflatten(-1, (attn.heads, head_dim))
    value = value.unflatten(-1, (attn.heads, head_dim))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if encoder_hidden_states is None:
        out = ex.attend(query, key, value, stream=IMAGE, backend=NATIVE)
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(query.dtype)))
    eq, ek, ev = (p.unflatten(-1, (attn.heads, head_dim)) for p in projections(attn, encoder_hidden_states,
                                                                               ADDED_QKV, None))
    if attn.norm_added_q is not None:
        eq = attn.norm_added_q(eq)
    if attn.norm_added_k is not None:
        ek = attn.norm_added_k(ek)
    out = ex.attend(ex.join(query, eq), ex.join(key, ek), ex.join(value, ev), backend=NATIVE)
    out, enc = ex.split(out.flatten(2, 3).to(query.dtype), hidden_states.shape[1])
    enc = None if attn.context_pre_only else attn.to_add_out(enc)
    return attn.to_out[1](attn.to_out[0](out)), enc


def sd3_joint_block(block, hidden_states, encoder_hidden_states, temb, ex: Mode = DENSE):
    """diffusers' ``JointTransformerBlock.forward`` (SD3 / SD3.5, MMDiT-X dual attention included; same operations,
    same order) with :func:`sd3_attention`, in mode ``ex`` (packed and sharded calls). ``temb (n_images, D)``: the
    time + pooled-text embedding per image; the AdaLN modules run through ``ex.ada_norm``. Returns
    ``(encoder_hidden_states or None for the last, context_pre_only block, hidden_states)``."""
    if block.use_dual_attention:
        norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_h2, gate_msa2 = ex.ada_norm(block.norm1, hidden_states,
                                                                                           temb, IMAGE)
    else:
        norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = ex.ada_norm(block.norm1, hidden_states, temb, IMAGE)
    if block.context_pre_only:
        norm_e = ex.ada_norm(block.norm1_context, encoder_hidden_states, temb, TEXT)
    else:
        norm_e, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = ex.ada_norm(block.norm1_context,
                                                                               encoder_hidden_states, temb, TEXT)
    attn_out, context_attn_out = sd3_attention(block.attn, norm_h, norm_e, ex)
    hidden_states = hidden_states + ex.tok(gate_msa, IMAGE) * attn_out
    if block.use_dual_attention:
        hidden_states = hidden_states + ex.tok(gate_msa2, IMAGE) * sd3_attention(block.attn2, norm_h2, None, ex)

    norm_h = block.norm2(hidden_states)
    norm_h = norm_h * (1 + ex.tok(scale_mlp, IMAGE)) + ex.tok(shift_mlp, IMAGE)
    hidden_states = hidden_states + ex.tok(gate_mlp, IMAGE) * _feed_forward(block, block.ff, norm_h)
    if block.context_pre_only:
        return None, hidden_states

    encoder_hidden_states = encoder_hidden_states + ex.tok(c_gate_msa, TEXT) * context_attn_out
    norm_e = block.norm2_context(encoder_hidden_states)
    norm_e = norm_e * (1 + ex.tok(c_scale_mlp, TEXT)) + ex.tok(c_shift_mlp, TEXT)
    encoder_hidden_states = encoder_hidden_states + ex.tok(c_gate_mlp, TEXT) * _feed_forward(block, block.ff_context,
                                                                                            norm_e)
    return encoder_hidden_states, hidden_states


@dataclass(frozen=True)
class SkipLayerGuidance:
    """Skip-layer guidance of SD3.5 (diffusers' ``StableDiffusion3Pipeline(skip_guidance_layers=layers,
    skip_layer_guidance_scale=scale, skip_layer_guidance_start=start, skip_layer_guidance_stop=stop)``; the
    defaults are diffusers' own; Stability AI recommends ``layers=(7, 8, 9)`` for SD3.5 Medium).

    With classifier-free guidance on, at a timestep inside the window the velocity is
    ``v = v_uncond + g (v_text - v_uncond) + scale (v_text - v_skip)``, ``v_skip`` the conditional prediction with
    the blocks ``layers`` (0-based) skipped; outside it, plain CFG. Without CFG (guidance <= 1) nothing changes,
    as in diffusers.

    Window: ``start < p < stop`` with ``p = 1 - sigma / (h - (h - 1) sigma)``, sigma = timestep / 1000 un-shifted
    by the scheduler's shift h: the fraction of the model's own time axis already travelled. It depends on the
    timestep only, so it means the same in a baseline and in every RALU stage. diffusers decides by step index
    (``N start < i < N stop`` for step i of N); on the scheduler's own N-step timesteps ``p_i = i (1 - s_min) /
    (N - 1)`` (s_min = the scheduler's ``sigma_min``, 0.003 at shift 3), so the two select the same steps for the
    default (0.01, 0.2) at every N below 100 (tested) and differ by at most one step at either end otherwise.

    Cost: one extra conditional forward (batch B) per step inside the window, outside the feature cache; reading
    the timestep is a host sync on CUDA, once per step while this is set. Not inside traced or captured calls
    (ONNX / TensorRT export, CUDA graphs): NotImplementedError there.
    """

    layers: tuple[int, ...]
    scale: float = 2.8
    start: float = 0.01
    stop: float = 0.2

    def __post_init__(self):
        layers = self.layers
        if isinstance(layers, (int, bool)) or not isinstance(layers, (tuple, list, range)) or not len(layers):
            raise ValueError(f"layers={layers!r}: give a non-empty tuple of block indices, e.g. (7, 8, 9)")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
            raise ValueError(f"layers={tuple(layers)!r}: block indices must be integers >= 0")
        object.__setattr__(self, "layers", tuple(sorted(set(int(i) for i in layers))))
        for name in ("scale", "start", "stop"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name}={v!r}: need a finite number")
            object.__setattr__(self, name, float(v))
        if not 0.0 <= self.start < self.stop <= 1.0:
            raise ValueError(f"start={self.start}, stop={self.stop}: need 0 <= start < stop <= 1 (fractions of the "
                             "denoising trajectory)")

    def progress(self, timestep: float, shift: float) -> float:
        """``p`` of a model timestep (``1000 sigma``) under scheduler shift ``shift`` (float64 arithmetic)."""
        sigma = float(timestep) / 1000.0
        return 1.0 - sigma / (shift - (shift - 1.0) * sigma)

    def active(self, timestep: float, shift: float) -> bool:
        """True where the skip-layer term applies at this timestep."""
        return self.start < self.progress(timestep, shift) < self.stop


def _doubled(grid: TokenGrid) -> TokenGrid:
    """``grid`` for the CFG batch ``[uncond ; cond]`` (the images twice)."""
    return TokenGrid(torch.cat([grid.positions] * 2), grid.grid_hw,
                     None if grid.fine_mask is None else torch.cat([grid.fine_mask] * 2), grid.raster)


def _tracing() -> bool:
    """True while the model call is being traced or captured (ONNX/TorchScript export, torch.export, a CUDA graph)."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class SD3Adapter(DiTAdapter):
    """Adapter for diffusers' ``StableDiffusion3Pipeline`` (SD3, SD3.5 Large, SD3.5 Medium transformers).

    ``skip_layer_guidance``: a :class:`SkipLayerGuidance` (or a dict of its fields), or None (default: off). Read
    when a ``generate`` call encodes its prompt, so a call runs with the setting it started with. It belongs to
    this adapter object: ``get_adapter(pipe)`` builds a new adapter (setting off) when ``pipe.transformer`` or
    ``pipe.vae`` is replaced.
    """

    family = "sd3"  # defaults: ralu_runtime.families
    runs_block_modules = True  # one-request calls run each JointTransformerBlock as the module it is
    default_preset = FAMILIES["sd3"].default_preset
    default_steps = FAMILIES["sd3"].default_steps
    default_guidance = FAMILIES["sd3"].default_guidance
    base_shift = FAMILIES["sd3"].base_shift

    supports_negative_prompt = True
    default_text_len = FAMILIES["sd3"].default_text_len  # CLIP tokens then T5 tokens

    user_settings = DiTAdapter.user_settings + ("skip_layer_guidance",)

    def __init__(self, pipe, *, weak: bool = False):
        super().__init__(pipe, weak=weak)
        self.transformer = pipe.transformer
        self._slg: SkipLayerGuidance | None = None

    @property
    def skip_layer_guidance(self) -> SkipLayerGuidance | None:
        return self._slg

    @skip_layer_guidance.setter
    def skip_layer_guidance(self, value) -> None:
        if isinstance(value, dict):
            value = SkipLayerGuidance(**value)
        if value is not None and not isinstance(value, SkipLayerGuidance):
            raise TypeError(f"skip_layer_guidance={value!r}: give a SkipLayerGuidance, a dict of its fields, or None")
        self._slg = value

    def check_supported(self) -> None:
        tr = self.transformer
        mods = [("transformer", tr)] + [(f"transformer_blocks.{i}", b) for i, b in enumerate(tr.transformer_blocks)]
        for name, mod in mods:
            registry = getattr(mod, "_diffusers_hook", None)
            names = getattr(registry, "hooks", None) or {}
            hooks = [str(h) for h in names if not str(h).startswith(STATELESS_HOOK_PREFIXES)]
            if hooks:
                raise ValueError(f"{name} carries diffusers hooks ({', '.join(hooks)}: e.g. diffusers.hooks."
                                 "apply_first_block_cache or context parallelism); they act through the transformer's "
                                 "own forward, which ralu does not call. Remove them (HookRegistry.remove_hook) and "
                                 "use generate(cache=...) for temporal caching")
            for attn_name in ("attn", "attn2"):
                proc = getattr(getattr(mod, attn_name, None), "processor", None)
                if proc is not None and "IPAdapter" in type(proc).__name__:
                    raise ValueError(f"{name}.{attn_name} has attention processor {type(proc).__name__}: ralu passes "
                                     "no IP-Adapter image embeddings, so it would be ignored; unload it "
                                     "(pipe.unload_ip_adapter()) to use ralu")
        slg = self._slg
        if slg is not None:
            n = len(tr.transformer_blocks)
            bad = [i for i in slg.layers if i >= n]
            if bad:
                raise ValueError(f"skip_layer_guidance layers {bad} do not exist: this transformer has {n} blocks "
                                 f"(0..{n - 1})")
            if self.pipe.scheduler.config.get("use_dynamic_shifting", False):
                raise ValueError("skip_layer_guidance needs a scheduler with a fixed shift (use_dynamic_shifting="
                                 "False, as SD3/SD3.5 ship): its window is placed on the scheduler's unshifted time "
                                 "axis")

    def max_size(self) -> int:
        """The sin-cos position table's side (``pos_embed_max_size`` tokens) in pixels."""
        return int(self.transformer.pos_embed.pos_embed_max_size) * self.patch_size * self.vae_scale_factor

    def embed_dims(self) -> tuple[int, int]:
        cfg = self.transformer.config
        return int(cfg.joint_attention_dim), int(cfg.pooled_projection_dim)

    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    def encode_prompt(self, prompt, negative_prompt=None, *, prompt_embeds=None, pooled_prompt_embeds=None,
                      negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, num_images_per_prompt=1,
                      guidance_scale, max_sequence_length=None):
        """The pipeline's own prompt encoding. ``data``: ``embeds (B', T, D)`` and ``pooled (B', P)`` with
        ``B' = 2B`` (negative rows first) under CFG, ``cfg``, ``guidance_scale``, and the call's skip-layer guidance
        (``slg``: a :class:`SkipLayerGuidance` or None; ``slg_shift``: the scheduler's shift)."""
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("SD3 needs pooled_prompt_embeds together with prompt_embeds")
        cfg = self.runs_cfg(guidance_scale, negative_prompt is not None or negative_prompt_embeds is not None)
        if prompt_embeds is not None and num_images_per_prompt > 1:
            # diffusers repeats encoded text per image but returns given embeddings as they are: repeat them here
            # (prompt-major, like its own repeat), so num_images_per_prompt means the same for both
            rep = lambda t: None if t is None else t.repeat_interleave(num_images_per_prompt, dim=0)  # noqa: E731
            prompt_embeds, pooled_prompt_embeds = rep(prompt_embeds), rep(pooled_prompt_embeds)
            negative_prompt_embeds = rep(negative_prompt_embeds)
            negative_pooled_prompt_embeds = rep(negative_pooled_prompt_embeds)
            num_images_per_prompt = 1
        pe, npe, pp, npp = self.pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=self.device,
            num_images_per_prompt=num_images_per_prompt, do_classifier_free_guidance=cfg,
            negative_prompt=negative_prompt, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            max_sequence_length=max_sequence_length or 256,
        )
        b = pe.shape[0]
        if cfg:
            pe, pp = torch.cat([npe, pe], dim=0), torch.cat([npp, pp], dim=0)
        slg = self._slg if cfg else None
        shift = float(self.pipe.scheduler.config.get("shift", 1.0))
        return Conditioning(b, {"embeds": pe, "pooled": pp, "cfg": cfg, "guidance_scale": guidance_scale,
                                "slg": slg, "slg_shift": shift if slg is not None else None})

    # ---- position embedding ----------------------------------------------------------------------------
    def sincos_at(self, positions: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Sin-cos embedding ``(B, L, D)`` float32 at ``positions (B, L, 2)`` on the centre crop of ``grid_hw``.

        Same formula and precision (float64, then float32) as the model's table, at any real position.
        """
        from diffusers.models.embeddings import get_1d_sincos_pos_embed_from_grid

        pe = self.transformer.pos_embed
        max_size = pe.pos_embed_max_size
        if grid_hw[0] > max_size or grid_hw[1] > max_size:
            raise ValueError(f"token grid {grid_hw} exceeds the model's pos_embed_max_size={max_size}")
        dim = pe.pos_embed.shape[-1]
        top, left = (max_size - grid_hw[0]) // 2, (max_size - grid_hw[1]) // 2
        scale = (max_size / pe.base_size) * pe.interpolation_scale
        pos = positions.reshape(-1, 2).to(torch.float64)
        rows = ((pos[:, 0] + top) / scale)
        cols = ((pos[:, 1] + left) / scale)
        # diffusers' table: first half from the column coordinate, second half from the row coordinate
        emb = torch.cat([
            get_1d_sincos_pos_embed_from_grid(dim // 2, cols, output_type="pt"),
            get_1d_sincos_pos_embed_from_grid(dim // 2, rows, output_type="pt"),
        ], dim=1)
        return emb.float().view(*positions.shape[:2], dim)

    def embed_tokens(self, tokens: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
        """Patch embedding plus position embedding of ``tokens (B, L, C p p)`` -> ``(B, L, D)``.

        Raster grids: the model's ``pos_embed`` module. Other token sets: its conv ``pos_embed.proj`` on each token's
        ``(C, p, p)`` patch (the module itself, so hooks and LoRA layers on it apply), its norm if any, plus
        :meth:`sincos_at` in the dtype of the model's table, added as ``PatchEmbed.forward`` adds it.
        """
        pe = self.transformer.pos_embed
        if grid.raster and grid.fine_mask is None:
            latent = self.unpack(tokens, grid.grid_hw[0] * self.patch_size, grid.grid_hw[1] * self.patch_size)
            return pe(latent)
        b, l, ct = tokens.shape
        p = self.patch_size
        patches = tokens.reshape(b * l, ct // (p * p), p, p)   # tokens are (channel, py, px) ordered
        hidden = pe.proj(patches).reshape(b, l, -1)
        if pe.layer_norm:
            hidden = pe.norm(hidden)
        pos = self.sincos_at(grid.positions, grid.grid_hw).to(device=hidden.device, dtype=pe.pos_embed.dtype)
        return (hidden + pos).to(hidden.dtype)

    # ---- model call --------------------------------------------------------------------------------------
    def _forward(self, ex: Mode, hidden: torch.Tensor, embeds: torch.Tensor, t: torch.Tensor, pooled: torch.Tensor,
                 impl: ModelImpl, skip: tuple[int, ...] = (), cached: bool = True, timestep=None) -> torch.Tensor:
        """The transformer after its patch embedding, in mode ``ex``: embedded image tokens ``hidden (B, L, D)`` and
        text ``embeds (B, T, D_text)`` in ``ex``'s layout (packed: ``B = 1`` holding every image; sharded: this
        rank's rows), per image timestep ``t (n_images,)`` (1000 sigma) and ``pooled (n_images, P)``. ``skip``: block
        indices left out (diffusers' ``skip_layers``); ``cached``: run the blocks through the call's feature cache
        (one-request modes; ``timestep`` the call's 0-dim timestep). Returns the output projection per token
        ``(B, L, p p C)`` in ``ex``'s layout (the patch's ``(py, px, C)`` order: :meth:`_as_tokens`)."""
        tr = self.transformer
        temb = tr.time_text_embed(t, pooled)
        enc = tr.context_embedder(embeds)

        blocks = [blk for i, blk in enumerate(tr.transformer_blocks) if i not in skip]
        modules = isinstance(ex, Dense)  # one request: the blocks as modules (see the module docstring)
        joint = impl.block(ex.block_name("sd3_joint"), sd3_block_call if modules else sd3_joint_block)

        def run(state, start, stop):  # blocks [start, stop) on state (encoder, image) hidden states
            e, h = state
            for blk in blocks[start:stop]:
                if modules or not (blk._forward_hooks or blk._forward_pre_hooks):
                    e, h = joint(blk, h, e, temb, ex)
                else:  # sharded (packed calls with hooks run per call): hooks see the block's keyword interface
                    e, h = call_with_hooks(blk, joint, (blk, h, e, temb, ex),
                                           dict(hidden_states=h, encoder_hidden_states=e, temb=temb))
            return e, h

        stack = BlockStack(run, len(blocks), (enc, hidden), lambda state: state[1], ex, IMAGE)
        hidden = self.run_stack(stack, hidden, timestep) if cached else stack.local()
        return ex.call(tr.proj_out, ex.ada_norm(tr.norm_out, hidden, temb, IMAGE))

    def _as_tokens(self, out: torch.Tensor) -> torch.Tensor:
        """The output projection ``(n, L, p p C)`` (``(py, px, C)`` per token) -> tokens ``(n, L, C p p)``."""
        n, l, _ = out.shape
        p = self.patch_size
        return out.view(n, l, p, p, -1).permute(0, 1, 4, 2, 3).reshape(n, l, -1)

    def _call(self, x: torch.Tensor, grid: TokenGrid, timestep: torch.Tensor, embeds: torch.Tensor,
              pooled: torch.Tensor, impl: ModelImpl, skip: tuple[int, ...] = (), cached: bool = True) -> torch.Tensor:
        """One request's transformer call on tokens ``x (N, L, C p p)`` with text ``embeds (N, T, D_text)`` and
        ``pooled (N, P)``: the model's output as tokens ``(N, L, C p p)``. Sharded across ranks when the running
        ``generate`` call has a sharding plan (every rank computes the patch embedding, keeps its rows of the joint
        sequence ``[image ; text]`` and returns the whole output)."""
        n, l, _ = x.shape
        hidden = self.embed_tokens(x, grid).contiguous()
        plan = current_sharding()
        ex = DENSE if plan is None else Sharded(plan, (l, embeds.shape[1]))
        out = self._forward(ex, ex.local(hidden, IMAGE).contiguous(), ex.local(embeds, TEXT), timestep.expand(n),
                            pooled, impl, skip, cached, timestep)
        return self._as_tokens(ex.whole(out, IMAGE))

    def velocity(self, tokens, grid, timestep, cond, impl: ModelImpl | None = None):
        """One request's velocity ``(B, L, C p p)`` (CFG and skip-layer guidance as the pipeline combines them);
        sharded across ranks when the running ``generate`` call has a sharding plan (every rank returns the whole
        velocity)."""
        impl = impl or EAGER
        data = cond.data
        if current_sharding() is not None:
            self.check_shardable()
        if not data["cfg"]:
            return self._call(tokens, grid, timestep, data["embeds"], data["pooled"], impl)
        slg = data.get("slg")
        if slg is not None and _tracing():
            raise NotImplementedError(
                "skip-layer guidance decides per timestep in Python; it cannot run inside a traced or captured model "
                "call (backend='onnx'/'tensorrt', or CUDA graphs): use backend='eager', or 'inductor' with "
                "compile_options={'cuda_graphs': False}")
        out = self._call(torch.cat([tokens, tokens]), _doubled(grid), timestep, data["embeds"], data["pooled"], impl)
        uncond, text = out.chunk(2)
        out = uncond + data["guidance_scale"] * (text - uncond)
        if slg is not None and slg.active(timestep, data["slg_shift"]):  # as diffusers: conditional rows only
            b = cond.batch
            skipped = self._call(tokens, grid, timestep, data["embeds"][b:], data["pooled"][b:], impl,
                                 skip=slg.layers, cached=False)
            out = out + (text - skipped) * slg.scale
        return out

    # ---- packed and sharded calls ------------------------------------------------------------------------
    packs = True
    shards = True
    packed_attention_backend = "auto"  # varlen_attention backend of packed_velocity ("auto", "sdpa", ...)

    def _custom_processors(self) -> list[str]:
        """``"transformer_blocks.i.attn: Name"`` for every attention whose processor :func:`sd3_attention` does not
        reproduce."""
        out = []
        for i, blk in enumerate(self.transformer.transformer_blocks):
            for name in ("attn", "attn2"):
                attn = getattr(blk, name, None)
                if attn is not None and type(attn.processor).__name__ not in JOINT_PROCESSORS:
                    out.append(f"transformer_blocks.{i}.{name}: {type(attn.processor).__name__}")
        return out

    def check_shardable(self) -> None:
        """ValueError unless ralu's block function can run this model sharded: diffusers' ``JointAttnProcessor2_0``
        on every attention, and no diffusers hook registry or torch hook on a block's attention modules or a diffusers
        hook registry on a block (the sharded call runs their layers itself and would bypass them; torch hooks on a
        block itself run, see :func:`~ralu_runtime.adapters.base.call_with_hooks`). Checked by ``prepare`` (before any
        work) and at every sharded call, on every rank alike."""
        bad = self._custom_processors()
        if bad:
            raise ValueError(f"context parallelism runs SD3's attention as ralu's copy of diffusers' "
                             f"JointAttnProcessor2_0; these attentions have another processor: {', '.join(bad)}. "
                             "Restore it with pipe.transformer.set_attn_processor(JointAttnProcessor2_0()) or run "
                             "unsharded")
        for i, blk in enumerate(self.transformer.transformer_blocks):
            registry = getattr(blk, "_diffusers_hook", None)
            attns = [a for a in (blk.attn, getattr(blk, "attn2", None)) if a is not None]
            own = forward_override(blk)
            if getattr(registry, "hooks", None) or own or any(has_hooks(a) for a in attns):
                raise ValueError(f"transformer_blocks.{i} carries diffusers hooks, a forward of its own "
                                 f"({own or 'none'}) or hooks on its attention modules; "
                                 "context parallelism runs SD3's blocks' layers itself and would bypass them: remove "
                                 "them (e.g. leaf-level group offloading instead of block-level) or run unsharded")

    def _packable_model(self, impl: ModelImpl | None = None) -> bool:
        """No hooks on what the packed call decomposes (the blocks, their AdaLN modules and attention modules, the
        final norm) and diffusers' own joint processor on every attention (the packed call reproduces it; a custom
        or fused processor runs only unpacked)."""
        tr = self.transformer
        if self._custom_processors():
            return False
        mods = [tr.norm_out]
        for blk in tr.transformer_blocks:
            mods += [blk, blk.norm1, blk.norm1_context, *(a for a in (blk.attn, getattr(blk, "attn2", None)) if a)]
        return can_pack(impl, mods)

    def packed_velocity(self, calls, impl: ModelImpl | None = None, *,
                        execution: PackedExecution | None = None) -> list[torch.Tensor]:
        """:meth:`velocity` of every call, all run as one transformer call over a packed token sequence.

        Every image of every call is one attention segment ``[its image tokens ; its text tokens]``; under
        classifier-free guidance a call brings its images twice (negative then positive prompt, as :meth:`velocity`
        does) and its result is combined with its own ``guidance_scale``. Time / pooled embeddings per image, AdaLN
        modulation per token of its segment, SD3.5's q/k norms and MMDiT-X's second (image-only) attention per
        segment; positions: :meth:`embed_tokens` per call, exactly as :meth:`velocity` computes them; text lengths
        may differ between calls. The blocks: :func:`sd3_joint_block` in the :class:`Packed` mode. Attention:
        :func:`ralu_kernels.attention.varlen_attention` (backend :attr:`packed_attention_backend`). Results equal
        the unpacked calls up to float rounding (fp32 on a CPU: about 1e-7 relative, tests/test_modes_sd3.py).

        Compiled blocks: with ``impl`` a compile runner's impl (``impl.packed_calls``; ``StageRunner.packed`` passes
        its ``execution``), :func:`sd3_joint_block` runs through ``impl.block("sd3_joint_packed", ...)`` (compiled
        with a symbolic packed token dimension) on a :class:`PackedSegments` layout (device tensors only; one padding
        segment); the patch and position embedding of every call runs before it, outside the compiled / captured
        part.

        Falls back to :meth:`velocity` (correct, unpacked; through the runner when it passes its ``execution``): for
        every call when ``impl`` is neither None / EAGER nor a packing impl, the calling ``generate`` has a feature
        cache (its state is per request), a block / AdaLN / attention module the packed call decomposes carries torch
        or diffusers hooks, or an attention processor is not diffusers' ``JointAttnProcessor2_0`` (the one-request
        path calls the modules, which runs them); for a call whose skip-layer guidance window is active at its
        timestep (its extra skip-layer forward runs another block stack; outside the window such a call packs like
        any other).
        """
        calls = check_velocity_calls(calls)
        execution = execution or PackedExecution(self, impl)
        if not self._packable_model(execution.impl):
            return [execution.velocity(c) for c in calls]
        out: list[torch.Tensor | None] = [None] * len(calls)
        packed = []
        for i, c in enumerate(calls):
            slg = c.cond.data.get("slg") if c.cond.data["cfg"] else None
            if slg is not None and (_tracing() or slg.active(c.timestep, c.cond.data["slg_shift"])):
                out[i] = execution.velocity(c)
            else:
                packed.append(i)
        if packed:
            for i, v in zip(packed, self._packed_call([calls[i] for i in packed], execution)):
                out[i] = v
        return out

    def _packed_call(self, calls: list[VelocityCall], execution: PackedExecution) -> list[torch.Tensor]:
        device, dtype = calls[0].tokens.device, calls[0].tokens.dtype
        hidden, counts = [], []
        for c in calls:
            x, grid = (torch.cat([c.tokens, c.tokens]), _doubled(c.grid)) if c.cond.data["cfg"] else (c.tokens, c.grid)
            h = self.embed_tokens(x, grid)
            hidden.append(h.reshape(-1, h.shape[-1]))
            counts.append(x.shape[0])
        hidden = torch.cat(hidden)
        t = torch.cat([c.timestep.reshape(()).expand(n) for c, n in zip(calls, counts)])
        pooled = torch.cat([c.cond.data["pooled"] for c in calls])
        embeds = torch.cat([c.cond.data["embeds"].reshape(-1, c.cond.data["embeds"].shape[-1]) for c in calls])

        per_image = lambda lens: [n for n, b in zip(lens, counts) for _ in range(b)]  # noqa: E731
        image_lens = per_image([c.tokens.shape[1] for c in calls])
        text_lens = per_image([c.cond.data["embeds"].shape[1] for c in calls])
        impl, backend = execution.impl, self.packed_attention_backend
        if not execution.static_layout:
            ex = Packed(HostSegments([image_lens, text_lens], device), backend)
            out = self._forward(ex, hidden[None], embeds[None], t, pooled, impl)
        else:
            n_img, n_txt, n_seg = len(hidden), len(embeds), len(image_lens)
            pad_img, pad_txt = execution.pad("image", n_img) - n_img, execution.pad("text", n_txt) - n_txt
            segs = execution.pad("segments", n_seg + 1)
            kind = static_attention(backend, device, dtype)
            lay = PackedSegments.build([image_lens, text_lens], [pad_img, pad_txt], segs, device, kind)
            tensors = [pad_rows(hidden, pad_img), pad_rows(embeds, pad_txt), pad_rows(t, segs - n_seg),
                       pad_rows(pooled, segs - n_seg), *lay.tensors()]

            def forward(*ts):  # the flat tensors only (a captured graph replays it for every mix of the same sizes)
                ex = Packed(PackedSegments.from_tensors(ts[4:], 2, kind), backend)
                return self._forward(ex, ts[0][None], ts[1][None], ts[2], ts[3], impl)

            out = execution.run(("sd3", kind, backend), forward, tensors)[:, :n_img]

        result = []
        for c, o in zip(calls, split_calls(out, calls, counts)):
            o = self._as_tokens(o)
            if c.cond.data["cfg"]:
                uncond, text = o.chunk(2)
                o = uncond + c.cond.data["guidance_scale"] * (text - uncond)
            result.append(o)
        return result

    def baseline_schedule(self, num_steps, image_seq_len):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

        sched = self.scheduler_copy()
        kwargs = {}
        if sched.config.get("use_dynamic_shifting", None):
            kwargs["mu"] = pipeline_mu(calculate_shift, sched.config, image_seq_len, max_shift=1.16)
        timesteps, _ = retrieve_timesteps(sched, num_steps, self.device, **kwargs)
        return timesteps, sched.sigmas.to(self.device)
