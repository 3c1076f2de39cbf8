"""Wan 2.1 / 2.2 text-to-video adapter (diffusers ``WanPipeline`` / ``WanTransformer3DModel``): UMT5 text states
through cross-attention, a 3-D RoPE on the video self-attention, classifier-free guidance, and Wan 2.2 A14B's two
experts (``transformer`` for high noise, ``transformer_2`` for low noise).

**Video as a tall image.** Latents are ``(B, 16, F, h, w)``; tokens are the model's own ``(1, 2, 2)`` patches in
frame-major raster order with channels ``(c, py, px)`` (:meth:`WanAdapter.pack`). The sampler stacks the frames
vertically (:class:`~ralu_runtime.adapters.base.TokenGrid` ``frames``): a token at tall-grid row ``r`` is in frame
``r // R`` (``R = grid_hw[0] // frames`` rows per frame) at row ``r - frame R``; RALU halves space only.

**Positions.** The model builds its RoPE table from the latent's shape (``WanRotaryPosEmbed``: per axis (frame, row,
col) of ``(t, h, w)`` head-dim channels, ``cos / sin`` of ``position * 10000^(-2i/d)`` in float64, channel pairs
interleaved). RALU needs per-image and half-integer positions, so the adapter computes the tables itself from every
token's (frame, row, col) (:meth:`WanAdapter.rotary`, ``(B, L, 1, head_dim)``: equal to the model's table on integer
grids) and runs the block stack itself. The patch embedding is the model's Conv3d module: on the 5-D latent for raster
token sets, on each token's ``(C, 1, 2, 2)`` patch otherwise (kernel = stride: the same map). Text tokens take no
position (cross-attention only). Nothing on the user's modules is replaced or patched.

**Execution modes** (:mod:`ralu_runtime.execution`). One block function, :func:`wan_block` with :func:`wan_attention`
(the same operations in the same order as diffusers' ``WanTransformerBlock`` and ``WanAttnProcessor``, on the blocks'
own layers, so LoRA layers and hooks on layers take effect), serves every mode: the mode ``ex`` decides how the
self-attention over the image stream and the cross-attention to the text stream run and how the per-image
modulation (each block's scale-shift table plus the time projection) reaches the tokens.

* One request (:class:`~ralu_runtime.execution.modes.Dense`): bitwise equal to calling the block modules.
* Context parallelism (:class:`~ralu_runtime.execution.sharding.Sharded`, when the running ``generate`` call has a
  sharding plan, ``generate(parallel=ContextParallelConfig(...))``): every rank holds its rows of the image tokens
  (any count, uneven shards) and the whole text; the self-attention is exact across ranks, the cross-attention local
  (the text is not sharded); every rank returns the whole velocity.
* Many requests in one call (:class:`~ralu_runtime.execution.packing.Packed`, :meth:`WanAdapter.packed_velocity`):
  every video its own self-attention segment and its own text segment, with its own timestep, text length and rotary
  positions; CFG passes are videos of their own; one packed call per expert.

Text masks: Wan has none (the pipeline zero-pads the UMT5 states to ``max_sequence_length`` and the cross-attention
attends to every text token, padding included), so every mode attends to all of a video's text tokens and a packed
call keeps them all in its text stream. Torch forward hooks on the blocks and on their ``attn1`` / ``attn2`` modules
run in one-request calls (:func:`~ralu_runtime.adapters.base.call_with_hooks`: hooks that observe; a hook returning
a replacement input or output raises NotImplementedError); a packed call with such hooks falls back to one call per
request.

**Guidance and experts.** As ``WanPipeline.__call__``: CFG when ``guidance_scale > 1`` with the negative prompt ("" by
default) as ``uncond + g (cond - uncond)``; the conditional and unconditional passes run as one batch of 2B (two passes
when the two text lengths differ, because Wan's cross-attention has no text mask). With ``boundary_ratio`` set (Wan
2.2 A14B) each model call picks its expert from its own timestep exactly as the pipeline does (``transformer`` when
``t >= boundary_ratio * num_train_timesteps``, else ``transformer_2`` with ``guidance_scale_2``); the low-noise
guidance is :attr:`WanAdapter.guidance_scale_2` (None: the same as ``guidance_scale``, the pipeline's default). That
choice reads the timestep on the host (one sync per step on CUDA); a traced / captured model call (ONNX / TensorRT
export, CUDA graphs) needs it fixed beforehand (:meth:`WanAdapter.specialize_call`). A feature cache is reset when
the expert changes.

**Schedulers.** :meth:`WanAdapter.baseline_schedule` reads the timesteps and sigmas of whatever flow scheduler the
pipeline has (the published ``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=...)`` or
``FlowMatchEulerDiscreteScheduler``). ``speedup=None`` equals the pipeline with either: with FlowMatchEuler ralu's
Euler is its step, with UniPC the baseline follows ``UniPCMultistepScheduler.step`` on a copy
(:func:`ralu_runtime.sampler.scheduler_integration`). RALU presets integrate their stages with ralu's own solver
(Euler by default; ``solver="dpmpp2m"`` is the nearest multistep one), not UniPC, and log a warning saying so.
h_ori for presets is the fixed flow shift.

**Refused** (:meth:`WanAdapter.check_supported`, before any work): attention processors other than diffusers'
``WanAttnProcessor``; image-conditioned (I2V) transformers (``image_dim`` / ``added_kv_proj_dim``); temporal patches
other than 1 or non-square spatial patches; diffusers hook registries on the blocks (:func:`check_blocks`) and
stateful ones (``enable_cache``, diffusers' own ``enable_parallelism``: use ``generate(parallel=...)``) on the
transformers; a ``boundary_ratio`` without ``transformer_2``; schedulers without flow sigmas; ``guidance_scale_2``
without a ``boundary_ratio``. Wan 2.2 TI2V 5B's ``expand_timesteps`` (per-token timesteps, all equal in
text-to-video) runs as the equal scalar timestep.

The VAE decode (``AutoencoderKLWan``: a stateful frame-by-frame loop with feature caches on the module) runs eagerly
and one call at a time per VAE.
"""
from __future__ import annotations


import torch

from ..families import FAMILIES, MODELS
from ..limits import MAX_GUIDANCE_SCALE
from ..execution.call import not_a_view, static_dims
from ..execution.modes import DENSE, Mode
from ..execution.packing import (HostSegments, Packed, PackedExecution, PackedSegments, can_pack, pad_rows,
                                 split_calls, static_attention)
from ..execution.sharding import Sharded
from ..offload import module_device, onload
from .base import (EAGER, STATELESS_HOOK_PREFIXES, BlockStack, Conditioning, DiTAdapter, ModelImpl, TokenGrid,
                   VelocityCall, call_with_hooks, check_blocks, check_velocity_calls, compute_dtype, current_cache,
                   current_call, current_sharding, scheduler_base_shift, vae_lock)

IMAGE, TEXT = 0, 1  # Wan's streams: the video tokens (self-attention, sharded) and the text (cross-attention keys)
_EXPERT_KEY = "wan.last_expert"  # CallState.adapter: the expert of the call's last model call (cache resets)
ROPE_THETA = 10000.0  # WanRotaryPosEmbed's theta (WanTransformer3DModel passes none: the default)

def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' ``WanAttnProcessor`` rotary embedding (same operations): ``x (B, S, H, Dh)``, ``cos`` / ``sin``
    ``(B, S, 1, Dh)`` with channel pairs interleaved."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = cos[..., 0::2]
    sin = sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def wan_attention(attn, hidden_states, encoder_hidden_states, rope, ex: Mode = DENSE) -> torch.Tensor:
    """diffusers' ``WanAttnProcessor`` on ``attn`` (a ``WanAttention`` of a text-to-video block; same operations, same
    order) in mode ``ex``. Self-attention (``encoder_hidden_states`` None): the image stream's tokens ``(B, L, D)``
    attend to each other with rotary ``rope = (cos, sin)`` ``(B, L, 1, Dh)``. Cross-attention: they attend to their
    own image's text tokens ``encoder_hidden_states (B, T, D)`` (no rotary). Returns ``(B, L, D)``. The projections
    are the model's own layers (``to_qkv`` / ``to_kv`` when the model's projections are fused)."""
    cross = encoder_hidden_states is not None
    if attn.fused_projections and not cross:
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    elif attn.fused_projections:
        query = attn.to_q(hidden_states)
        key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
    else:
        kv_in = encoder_hidden_states if cross else hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(kv_in), attn.to_v(kv_in)
    query = attn.norm_q(query)
    key = attn.norm_k(key)
    query = query.unflatten(2, (attn.heads, -1))
    key = key.unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))
    if rope is not None:
        query = _rotate(query, *rope)
        key = _rotate(key, *rope)
    proc = attn.processor
    backend = getattr(proc, "_attention_backend", None)
    if cross:
        out = ex.cross_attend(query, key, value, q_stream=IMAGE, kv_stream=TEXT, backend=backend)
    else:
        out = ex.attend(query, key, value, stream=IMAGE, backend=backend,
                        parallel_config=getattr(proc, "_parallel_config", None))
    out = out.flatten(2, 3).type_as(query)
    return attn.to_out[1](attn.to_out[0](out))


def _attention(attn, hidden_states, encoder_hidden_states, rope, ex: Mode):
    """:func:`wan_attention` with the torch forward hooks of the ``attn`` module run around it (observing hooks;
    :func:`call_with_hooks`), as when the block called the module."""
    args = (attn, hidden_states, encoder_hidden_states, rope, ex)
    if not (attn._forward_hooks or attn._forward_pre_hooks):
        return wan_attention(*args)
    return call_with_hooks(attn, wan_attention, args, dict(hidden_states=hidden_states,
                                                           encoder_hidden_states=encoder_hidden_states,
                                                           attention_mask=None, rotary_emb=rope))


def wan_block(block, hidden_states, encoder_hidden_states, temb, rope_cos, rope_sin, ex: Mode = DENSE):
    """diffusers' ``WanTransformerBlock.forward`` (its per-image path ``temb (n, 6, D)``; same operations, same order)
    with :func:`wan_attention`, in mode ``ex``: image tokens ``hidden_states (B, L, D)`` and text
    ``encoder_hidden_states (B, T, D)`` in ``ex``'s layout, ``temb`` the time projection per image, rotary
    ``rope_cos`` / ``rope_sin`` ``(B, L, 1, Dh)``. The six modulation vectors (the block's scale-shift table plus the
    time projection) reach every image's tokens through ``ex.tok``. Returns the new image tokens."""
    mod = (block.scale_shift_table + temb.float()).chunk(6, dim=1)
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (ex.tok(m.squeeze(1), IMAGE) for m in mod)
    rope = (rope_cos, rope_sin)

    norm_h = (block.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa).type_as(hidden_states)
    attn_out = _attention(block.attn1, norm_h, None, rope, ex)
    hidden_states = (hidden_states.float() + attn_out * gate_msa).type_as(hidden_states)

    norm_h = block.norm2(hidden_states.float()).type_as(hidden_states)
    attn_out = _attention(block.attn2, norm_h, encoder_hidden_states, None, ex)
    hidden_states = hidden_states + attn_out

    norm_h = (block.norm3(hidden_states.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(hidden_states)
    ff_out = block.ffn(norm_h)
    return (hidden_states.float() + ff_out.float() * c_gate_msa).type_as(hidden_states)


def _tracing() -> bool:
    """True while the model call is being traced or captured (ONNX/TorchScript export, torch.export, a CUDA graph)."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class WanAdapter(DiTAdapter):
    """Adapter for diffusers' ``WanPipeline`` (Wan 2.1 T2V 1.3B / 14B, Wan 2.2 T2V A14B with two experts).

    ``guidance_scale_2``: the low-noise expert's guidance scale (the pipeline's ``guidance_scale_2``; None = the same
    as ``generate``'s ``guidance_scale``), read when a ``generate`` call encodes its prompt. It belongs to this
    adapter object: ``get_adapter(pipe)`` builds a new adapter (setting the default) when a transformer or the VAE is
    replaced. With two experts (Wan 2.2 T2V A14B) the defaults are the release's: 40 steps, ``guidance_scale`` 4.0 for
    the high-noise expert and ``guidance_scale_2`` 3.0 for the low-noise one (as ``pipe(guidance_scale=4.0,
    guidance_scale_2=3.0, num_inference_steps=40)``); one transformer: None, 50 steps, 5.0."""

    family = "wan"  # defaults: ralu_runtime.families (Wan 2.2 T2V A14B's in __init__)
    default_preset = FAMILIES["wan"].default_preset
    default_steps = FAMILIES["wan"].default_steps
    default_guidance = FAMILIES["wan"].default_guidance
    default_size = FAMILIES["wan"].default_size  # square fallback; generate uses default_hw() = (480, 832)
    default_text_len = FAMILIES["wan"].default_text_len
    base_shift = FAMILIES["wan"].base_shift    # the published flow_shift; presets use preset_base_shift(h, w)
    supports_negative_prompt = True
    takes_prompt_mask = False
    is_video = True
    default_frames = FAMILIES["wan"].default_frames
    temporal_factor = FAMILIES["wan"].temporal_factor
    default_max_sequence_length = 512          # WanPipeline.__call__'s default
    # torch 2.13's TorchScript-based ONNX exporter fails on the model call (an internal "Expand input shape" assert at
    # the rotary embedding's strided writes; written as a stack instead, the exporter segfaults): refused up front
    onnx_refusal = ("torch's ONNX exporter cannot export Wan's model call (an internal shape-inference assert in "
                    "torch.onnx.export); use backend='inductor' or 'eager'")

    user_settings = DiTAdapter.user_settings + ("guidance_scale_2",)

    def __init__(self, pipe, *, weak: bool = False):
        super().__init__(pipe, weak=weak)
        self.transformer = pipe.transformer
        self.transformer_2 = getattr(pipe, "transformer_2", None)
        self.guidance_scale_2: float | None = None
        if self.boundary_ratio is not None:  # two experts: Wan 2.2 T2V A14B's published sampler
            a14b = MODELS["wan22-a14b"]
            self.default_steps, self.default_guidance = a14b.steps, a14b.guidance
            self.guidance_scale_2 = a14b.guidance_2
        self._inv_freq: dict[torch.device, list[torch.Tensor]] = {}

    def read_components(self) -> tuple:
        pipe = self.pipe
        if pipe is None:
            return ()
        return (getattr(pipe, "transformer", None), getattr(pipe, "vae", None), getattr(pipe, "transformer_2", None))

    # ---- checks and geometry ---------------------------------------------------------------------------
    @property
    def boundary_ratio(self) -> float | None:
        """The pipeline's ``boundary_ratio`` (Wan 2.2 A14B: 0.875), or None (one transformer)."""
        return getattr(self.pipe.config, "boundary_ratio", None)

    def experts(self) -> list[tuple[str, torch.nn.Module]]:
        """``(name, transformer)`` of the models this pipeline runs: ``transformer`` and, with a ``boundary_ratio``,
        ``transformer_2``."""
        out = [("transformer", self.transformer)]
        if self.boundary_ratio is not None:
            out.append(("transformer_2", self.transformer_2))
        return out

    def model_modules(self) -> list[torch.nn.Module]:
        return [tr for _, tr in self.experts() if tr is not None]

    def check_supported(self) -> None:
        if self.transformer is None:
            raise ValueError("this WanPipeline has no `transformer`: ralu needs it (the high-noise expert, or the only "
                             "model)")
        if self.boundary_ratio is not None and self.transformer_2 is None:
            raise ValueError(f"this WanPipeline has boundary_ratio={self.boundary_ratio} but no transformer_2 (the "
                             "low-noise expert); diffusers could not run its low-noise steps either")
        if self.boundary_ratio is None and self.guidance_scale_2 is not None:
            raise ValueError("guidance_scale_2 is only supported when the pipeline's boundary_ratio is not None "
                             "(Wan 2.2 A14B's two experts), as in WanPipeline")
        g2 = self.guidance_scale_2
        if g2 is not None and (isinstance(g2, bool) or not isinstance(g2, (int, float)) or g2 != g2
                               or not 0.0 <= g2 <= MAX_GUIDANCE_SCALE):
            raise ValueError(f"guidance_scale_2={g2!r} is not allowed: need a number in [0, {MAX_GUIDANCE_SCALE:g}] "
                             "(as guidance_scale) or None (the same as guidance_scale)")
        sched = self.pipe.scheduler
        cfg = sched.config
        if type(sched).__name__ != "FlowMatchEulerDiscreteScheduler" and not cfg.get("use_flow_sigmas", False):
            raise ValueError(f"the pipeline's {type(sched).__name__} has no flow sigmas (use_flow_sigmas=False): ralu "
                             "reads a flow-matching schedule from it (Wan's published UniPCMultistepScheduler has "
                             "use_flow_sigmas=True, or use FlowMatchEulerDiscreteScheduler)")
        if cfg.get("use_dynamic_shifting", False):
            raise ValueError("the pipeline's scheduler has use_dynamic_shifting=True: WanPipeline passes no mu, so "
                             "it cannot set its timesteps (Wan uses a fixed flow shift)")
        for name, tr in self.experts():
            c = tr.config
            pt, ph, pw = c.patch_size
            if pt != 1 or ph != pw:
                raise ValueError(f"{name} has patch_size={tuple(c.patch_size)}; ralu supports Wan's (1, p, p) patches")
            if c.image_dim is not None or c.added_kv_proj_dim is not None:
                raise ValueError(f"{name} is an image-conditioned (I2V) Wan transformer (image_dim={c.image_dim}, "
                                 f"added_kv_proj_dim={c.added_kv_proj_dim}); ralu supports WanPipeline's "
                                 "text-to-video transformers")
            if (c.out_channels or c.in_channels) != c.in_channels:
                raise ValueError(f"{name} has in_channels={c.in_channels} but out_channels={c.out_channels}; a "
                                 "text-to-video transformer predicts the velocity of its own latents")
            registry = getattr(tr, "_diffusers_hook", None)
            hooks = [str(h) for h in (getattr(registry, "hooks", None) or {})
                     if not str(h).startswith(STATELESS_HOOK_PREFIXES)]
            if hooks:
                raise ValueError(f"{name} carries diffusers hooks ({', '.join(hooks)}: e.g. enable_cache or context "
                                 "parallelism); they act through the transformer's own forward, which ralu does not "
                                 "call. Remove them (pipe.transformer.disable_cache(), HookRegistry.remove_hook) and "
                                 "use generate(cache=...) for temporal caching, generate(parallel=ContextParallelConfig("
                                 "...)) for context parallelism")
            blocks = [(f"{name}.blocks.{i}", b) for i, b in enumerate(tr.blocks)]
            for attn in ("attn1", "attn2"):
                check_blocks(blocks, ("WanAttnProcessor",), "Wan", attn=attn)
        if self.boundary_ratio is not None:
            a, b = self.transformer.config, self.transformer_2.config
            for key in ("patch_size", "in_channels", "text_dim", "num_attention_heads", "attention_head_dim",
                        "rope_max_seq_len"):
                va, vb = getattr(a, key), getattr(b, key)
                if (tuple(va) != tuple(vb)) if key == "patch_size" else (va != vb):
                    raise ValueError(f"transformer and transformer_2 differ in {key} ({va} vs {vb}); the two experts "
                                     "must share the token layout and rotary embedding")

    def default_hw(self) -> tuple[int, int]:
        """WanPipeline's default (height, width): 480 x 832 pixels."""
        return 480, 832

    def max_size(self) -> int:
        """The RoPE table's length per axis (``rope_max_seq_len`` tokens, 1024 for Wan) in pixels."""
        return int(self.transformer.config.rope_max_seq_len) * self.patch_size * self.vae_scale_factor

    def embed_dims(self) -> tuple[int, None]:
        return int(self.transformer.config.text_dim), None

    @property
    def patch_size(self) -> int:
        return int(self.transformer.config.patch_size[1])

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor_spatial)

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    def preset_base_shift(self, height: int, width: int) -> float:
        """h_ori: the scheduler's fixed flow shift (UniPC ``flow_shift`` with flow sigmas, or FlowMatchEuler
        ``shift``); the same at every size and frame count (Wan's schedulers do not shift dynamically)."""
        cfg = self.pipe.scheduler.config
        if cfg.get("use_flow_sigmas", False):
            return float(cfg.get("flow_shift", 1.0))
        frames = (self.default_frames - 1) // self.temporal_factor + 1
        return scheduler_base_shift(cfg, self.fine_tokens(height, width, frames))

    # ---- tokens --------------------------------------------------------------------------------------
    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, F, h, w)`` -> ``(B, F (h/p) (w/p), C p p)``: frame-major raster tokens, channels ``(c, py, px)``
        (the order of the model's Conv3d patch embedding weights with temporal patch 1)."""
        if latents.ndim != 5:
            raise ValueError(f"Wan latents are (B, C, F, h, w); got shape {tuple(latents.shape)}")
        b, c, f, h, w = latents.shape
        p = self.patch_size
        x = latents.view(b, c, f, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 4, 6)
        return x.reshape(b, f * (h // p) * (w // p), c * p * p)

    def unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Inverse of :meth:`pack` (the frame count from the token count): -> ``(B, C, F, h, w)``."""
        b, n, ct = tokens.shape
        p = self.patch_size
        per_frame = (h // p) * (w // p)
        if n % per_frame:
            raise ValueError(f"{n} tokens are not whole frames of {h // p} x {w // p} tokens")
        f = n // per_frame
        c = ct // (p * p)
        x = tokens.view(b, f, h // p, w // p, c, p, p).permute(0, 4, 1, 2, 5, 3, 6)
        return x.reshape(b, c, f, h, w)

    def max_latent_frames(self) -> int:
        """The transformer's RoPE table length (``rope_max_seq_len``) in latent frames."""
        return int(self.transformer.config.rope_max_seq_len)

    def prepare_noise(self, batch, height, width, generators, dtype, num_frames=None):
        """``(B, C, F, h, w)`` drawn exactly as ``WanPipeline.prepare_latents`` draws it (float32, same shape and
        generator use), then cast to ``dtype``."""
        from diffusers.utils.torch_utils import randn_tensor

        num_frames = self.default_frames if num_frames is None else num_frames
        if (num_frames - 1) % self.temporal_factor or num_frames < 1:
            raise ValueError(f"num_frames={num_frames} is not allowed: Wan needs 1 + a multiple of "
                             f"{self.temporal_factor} frames")
        f = self.latent_frames(num_frames)
        cap = self.max_latent_frames()
        if f > cap:
            raise ValueError(f"num_frames={num_frames} gives {f} latent frames; the model's RoPE covers {cap}")
        h, w = self.latent_hw(height, width)
        shape = (batch, self.latent_channels, f, h, w)
        noise = randn_tensor(shape, generator=generators, device=self.device, dtype=torch.float32)
        return noise.to(dtype)

    # ---- prompts -----------------------------------------------------------------------------------------
    def encode_prompt(self, prompt, negative_prompt=None, *, prompt_embeds=None, pooled_prompt_embeds=None,
                      negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, num_images_per_prompt=1,
                      guidance_scale, max_sequence_length=None, prompt_embeds_mask=None,
                      negative_prompt_embeds_mask=None):
        """The pipeline's ``encode_prompt`` (UMT5 states zero-padded to ``max_sequence_length``, 512 by default; the
        empty negative prompt under CFG). ``data``: ``embeds (B, T, D)`` and ``negative_embeds (B, T', D)`` or None,
        in the transformer's dtype; ``cfg``; ``guidance_scale``; ``guidance_scale_2`` (low-noise expert) and
        ``boundary`` (``boundary_ratio * num_train_timesteps``) or None."""
        if pooled_prompt_embeds is not None or negative_pooled_prompt_embeds is not None:
            raise ValueError("Wan takes no pooled text embedding")
        if prompt_embeds_mask is not None or negative_prompt_embeds_mask is not None:
            raise ValueError("Wan takes no text-token mask")
        cfg = self.runs_cfg(guidance_scale, negative_prompt is not None or negative_prompt_embeds is not None)
        n = num_images_per_prompt
        max_len = max_sequence_length or self.default_max_sequence_length
        if prompt_embeds is not None and n > 1:
            # WanPipeline returns given embeddings unrepeated (its transformer call then fails): repeat them here,
            # prompt-major like its own repeat of encoded text
            prompt_embeds = prompt_embeds.repeat_interleave(n, dim=0)
            if negative_prompt_embeds is not None:
                negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(n, dim=0)
            n = 1
        if prompt is not None and self.pipe.text_encoder is None:
            raise ValueError("this pipeline has no text encoder: give prompt_embeds (and negative_prompt_embeds for "
                             "classifier-free guidance) instead of a text prompt")
        if cfg and negative_prompt_embeds is None and self.pipe.text_encoder is None:
            raise ValueError("classifier-free guidance (guidance_scale > 1) needs negative_prompt_embeds: this "
                             "pipeline has no text encoder to encode the empty negative prompt")
        if prompt_embeds is not None:
            prompt_embeds = prompt_embeds.to(self.device)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(self.device)
        pe, ne = self.pipe.encode_prompt(prompt=prompt, negative_prompt=negative_prompt,
                                         do_classifier_free_guidance=cfg, num_videos_per_prompt=n,
                                         prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                         max_sequence_length=max_len, device=self.device)
        dtype = self.dtype
        pe = pe.to(dtype)
        ne = ne.to(dtype) if (cfg and ne is not None) else None
        boundary = self.boundary_ratio
        g2 = None
        if boundary is not None:
            boundary = float(boundary * self.pipe.scheduler.config.num_train_timesteps)
            g2 = float(guidance_scale if self.guidance_scale_2 is None else self.guidance_scale_2)
        return Conditioning(pe.shape[0], {"embeds": pe, "negative_embeds": ne, "cfg": cfg,
                                          "guidance_scale": float(guidance_scale), "guidance_scale_2": g2,
                                          "boundary": boundary})

    # ---- experts -----------------------------------------------------------------------------------------
    def expert_index(self, timestep, cond: Conditioning) -> int:
        """0 (``transformer``) or 1 (``transformer_2``) for a model call at ``timestep``, as ``WanPipeline.__call__``
        decides: ``transformer`` when there is no boundary or ``t >= boundary_ratio * num_train_timesteps`` (torch's
        comparison of the timestep tensor with the Python float, as the pipeline makes it). A fixed choice in
        ``cond.data["expert"]`` (:meth:`specialize_call`) wins."""
        data = cond.data
        boundary = data.get("boundary")
        if boundary is None:
            return 0
        fixed = data.get("expert")
        if fixed is not None:
            return int(fixed)
        if _tracing():
            raise NotImplementedError(
                "Wan 2.2's expert choice reads the timestep on the host; it cannot run inside a traced or captured "
                "model call (backend='onnx'/'tensorrt', or CUDA graphs) unless the runner fixes it per call with "
                "WanAdapter.specialize_call: use backend='eager', or 'inductor' with compile_options={'cuda_graphs': "
                "False}")
        t = timestep if torch.is_tensor(timestep) else torch.tensor(float(timestep))
        if t.device.type == "meta":  # shapes only (FLOP counting): both experts have the same shape
            return 0
        return 0 if bool(t >= boundary) else 1

    def specialize_call(self, timestep, cond: Conditioning) -> Conditioning:
        """``cond`` with this call's expert fixed (``data["expert"]``, a constant: compiled / captured artifacts keyed
        by the conditioning's constants then hold one expert each). Identity for one-transformer pipelines."""
        if cond.data.get("boundary") is None or cond.data.get("expert") is not None:
            return cond
        return Conditioning(cond.batch, {**cond.data, "expert": self.expert_index(timestep, cond)})

    def _note_expert(self, expert: int) -> None:
        """Reset the call's feature cache when the expert changes (its features belong to the other model). The last
        expert is kept in the running ``generate`` call's own state (``CallState.adapter``), so concurrent calls
        (threads) never see each other's."""
        cache = current_cache()
        if cache is None:
            return
        state = current_call().adapter
        last = state.get(_EXPERT_KEY)
        state[_EXPERT_KEY] = expert
        if last is not None and last != expert:
            cache.reset()

    # ---- positions -----------------------------------------------------------------------------------------
    def rope_frequencies(self, device=None) -> list[torch.Tensor]:
        """Per axis (frame, row, col): inverse frequencies ``(d_a / 2,)`` float64, as ``get_1d_rotary_pos_embed``
        computes them for ``WanRotaryPosEmbed`` (``1 / theta^(arange(0, d, 2) / d)``), kept per device."""
        device = torch.device("cpu") if device is None else torch.device(device)
        freqs = self._inv_freq.get(device)
        if freqs is None:
            rope = self.transformer.rope
            freqs = [(1.0 / (ROPE_THETA ** (torch.arange(0, d, 2, dtype=torch.float64) / d))).to(device)
                     for d in (rope.t_dim, rope.h_dim, rope.w_dim)]
            self._inv_freq[device] = freqs
        return freqs

    @staticmethod
    def frame_positions(grid: TokenGrid) -> torch.Tensor:
        """``(B, L, 3)`` float64 (frame, row, col) of the tokens of a tall grid: ``frame = floor(r / R)``, ``row = r -
        frame R`` with ``R = grid_hw[0] // grid.frames`` rows per frame (integer frames; half-integer rows and columns
        of stage-2 children stay)."""
        frames = int(getattr(grid, "frames", 1))
        rows = grid.grid_hw[0] // frames
        pos = grid.positions.to(torch.float64)
        r, c = pos[..., 0], pos[..., 1]
        f = torch.floor(r / rows)
        return torch.stack([f, r - f * rows, c], dim=-1)

    def rotary(self, grid: TokenGrid) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image rotary ``(cos, sin)``, each ``(B, L, 1, head_dim)`` in the dtype of the model's own table
        (float32): per axis ``cos / sin`` of ``position * inv_freq`` in float64, channel pairs interleaved, axes in
        the model's (frame, row, col) order; equal to ``WanRotaryPosEmbed``'s table at integer positions."""
        return self.rotary_tables(self.frame_positions(grid))

    def rotary_tables(self, fpos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`rotary` from (frame, row, col) positions ``fpos (..., 3)`` float64: ``(cos, sin)`` ``(..., 1,
        head_dim)``."""
        ang = torch.cat([fpos[..., a, None] * inv for a, inv in enumerate(self.rope_frequencies(fpos.device))], dim=-1)
        dtype = self.transformer.rope.freqs_cos.dtype
        if dtype == torch.float64 or not dtype.is_floating_point:
            dtype = torch.float32
        cos = ang.cos().repeat_interleave(2, dim=-1).to(dtype).unsqueeze(-2)
        sin = ang.sin().repeat_interleave(2, dim=-1).to(dtype).unsqueeze(-2)
        return cos, sin

    # ---- model ---------------------------------------------------------------------------------------------
    def embed_patches(self, tr, tokens: torch.Tensor) -> torch.Tensor:
        """``tr``'s Conv3d patch embedding of every token's own ``(C, 1, p, p)`` patch: ``tokens (..., C p p)`` ->
        ``(..., D)`` (kernel = stride: the map the model applies to the 5-D latent)."""
        p = self.patch_size
        ct = tokens.shape[-1]
        flat = tokens.reshape(-1, ct // (p * p), 1, p, p)
        return tr.patch_embedding(flat).reshape(*tokens.shape[:-1], -1)

    def embed_tokens(self, tr, tokens: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
        """The model's Conv3d patch embedding of ``tokens (B, L, C p p)`` -> ``(B, L, D)``: on the 5-D latent for
        raster token sets (the model's own path), else on each token's ``(C, 1, p, p)`` patch (the same map)."""
        p = self.patch_size
        frames = int(getattr(grid, "frames", 1))
        if grid.raster and grid.fine_mask is None:
            latent = self.unpack(tokens, (grid.grid_hw[0] // frames) * p, grid.grid_hw[1] * p)
            hidden = tr.patch_embedding(latent).flatten(2).transpose(1, 2)
        else:
            hidden = self.embed_patches(tr, tokens)
        return hidden.contiguous()

    def _forward(self, ex: Mode, tr, hidden: torch.Tensor, embeds: torch.Tensor, t: torch.Tensor, rope,
                 impl: ModelImpl, timestep: torch.Tensor | None = None) -> torch.Tensor:
        """Transformer ``tr`` in mode ``ex`` from the embedded image tokens ``hidden (B, L, D)`` and the text ``embeds
        (B, T, D_text)`` in ``ex``'s layout (packed: ``B = 1`` holding every image; sharded: this rank's image rows,
        the whole text), per image timesteps ``t (n_images,)`` (``1000 sigma``) and rotary ``rope = (cos, sin)``
        ``(B, L, 1, Dh)``. ``timestep``: the call's 0-dim timestep for the call's feature cache (one-request modes;
        None: no cache). Returns the model's output tokens ``(B, L, C p p)`` (channels ``(c, py, px)``) in ``ex``'s
        layout."""
        temb, proj, enc, _ = tr.condition_embedder(t, embeds, None)
        proj = proj.unflatten(1, (6, -1))
        enc = not_a_view(enc)  # every block's argument (the stack's state, hidden, is made one by BlockStack)
        block_fn = impl.block(ex.block_name("wan_block"), wan_block)
        blocks = list(tr.blocks)
        rope = tuple(static_dims(r, -2, -1) for r in rope)  # (..., 1, head_dim): static when compiled

        def run(h, start, stop):
            for blk in blocks[start:stop]:
                args = (blk, h, enc, proj, *rope, ex)
                if blk._forward_hooks or blk._forward_pre_hooks:
                    h = call_with_hooks(blk, block_fn, args, dict(hidden_states=h, encoder_hidden_states=enc,
                                                                  temb=proj, rotary_emb=rope))
                else:
                    h = block_fn(*args)
            return h

        stack = BlockStack(run, len(blocks), hidden, lambda h: h, ex, IMAGE)
        hidden = stack.local() if timestep is None else self.run_stack(stack, hidden, timestep)
        shift, scale = (tr.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        shift, scale = ex.tok(shift.squeeze(1).to(hidden.device), IMAGE), ex.tok(scale.squeeze(1).to(hidden.device),
                                                                                 IMAGE)
        hidden = (tr.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        out = ex.call(tr.proj_out, hidden)
        b, l, p = out.shape[0], out.shape[1], self.patch_size
        return out.view(b, l, p, p, -1).permute(0, 1, 4, 2, 3).reshape(b, l, -1)  # (py, px, c) -> (c, py, px)

    def _request(self, tr, hidden: torch.Tensor, embeds: torch.Tensor, timestep: torch.Tensor, rope,
                 impl: ModelImpl, cached: bool = True) -> torch.Tensor:
        """One request's transformer call on ``hidden (N, L, D)`` and text ``embeds (N, T, D_text)``: :class:`Dense`,
        or :class:`Sharded` over the image rows when the running ``generate`` call has a sharding plan (every rank
        holds the whole text and returns the whole output). ``cached``: through the call's feature cache."""
        plan = current_sharding()
        ex = DENSE if plan is None else Sharded(plan, (hidden.shape[1],))
        n = hidden.shape[0]
        out = self._forward(ex, tr, ex.local(hidden, IMAGE), embeds, timestep.expand(n),
                            tuple(ex.local(r, IMAGE) for r in rope), impl, timestep if cached else None)
        return ex.whole(out, IMAGE)

    def _expert(self, expert: int, data: dict):
        """``(transformer, guidance scale)`` of expert ``expert`` (:meth:`expert_index`) for a call's ``cond.data``."""
        if expert == 0:
            return self.transformer, data["guidance_scale"]
        return self.transformer_2, data["guidance_scale_2"]

    def onload_models(self, timestep, cond) -> None:
        """The expert that runs at ``timestep`` only (Wan 2.2: moving ``transformer_2`` in offloads ``transformer``,
        the model before it in the pipeline's offload order, as its forward does)."""
        onload(self._expert(self.expert_index(timestep, cond), cond.data)[0])

    def velocity(self, tokens, grid, timestep, cond, impl: ModelImpl | None = None):
        """One request's velocity ``(B, L, C p p)`` (CFG combined); sharded across ranks when the running ``generate``
        call has a sharding plan (context parallelism: every rank returns the whole velocity)."""
        impl = impl or EAGER
        data = cond.data
        expert = self.expert_index(timestep, cond)
        tr, scale = self._expert(expert, data)
        if data.get("boundary") is not None:
            self._note_expert(expert)
        if not torch.is_tensor(timestep):
            timestep = torch.tensor(float(timestep), device=tokens.device)
        hidden = self.embed_tokens(tr, tokens, grid)
        rope = self.rotary(grid)
        pe, ne = data["embeds"], data["negative_embeds"]
        if not data["cfg"]:
            return self._request(tr, hidden, pe, timestep, rope, impl)
        if ne.shape[1] == pe.shape[1]:
            out = self._request(tr, torch.cat([hidden, hidden]), torch.cat([ne, pe]), timestep,
                                tuple(torch.cat([r, r]) for r in rope), impl)
            uncond, text = out.chunk(2)
        else:  # different text lengths: two passes (no text mask in Wan's cross-attention), outside the cache
            text = self._request(tr, hidden, pe, timestep, rope, impl, cached=False)
            uncond = self._request(tr, hidden, ne, timestep, rope, impl, cached=False)
        return uncond + scale * (text - uncond)

    # ---- packed calls ----------------------------------------------------------------------------------------
    packs = True
    shards = True
    sharded_text = False  # the sharded sequence is the image tokens only (every rank cross-attends the whole text)
    packed_attention_backend = "auto"  # varlen_attention backend of packed_velocity ("auto", "sdpa", ...)

    def _bypassed_by_packing(self) -> list:
        """Modules whose torch hooks the one-request call runs (:func:`call_with_hooks`) and a packed call cannot
        (they would see the packed layout): every expert's blocks and their attention modules."""
        mods = []
        for _, tr in self.experts():
            for blk in tr.blocks:
                mods += [blk, blk.attn1, blk.attn2]
        return mods

    def packed_velocity(self, calls, impl: ModelImpl | None = None, *,
                        execution: PackedExecution | None = None) -> list[torch.Tensor]:
        """:meth:`velocity` of every call, run as packed transformer calls: one per expert among the calls.

        Every video of every call is one attention segment of the image stream (self-attention with its own rotary
        positions) and one of the text stream (its cross-attention keys); each has its own timestep, text and text
        length. CFG: a call's unconditional and conditional passes are two videos each (their texts may differ in
        length: no second pass as in :meth:`velocity`), combined per call with the guidance scale of its expert.

        Wan 2.2 A14B: a packed call runs one transformer, so the calls are grouped by expert (:meth:`expert_index`,
        one host read of each call's timestep unless :meth:`specialize_call` fixed it) and each group is one packed
        call; results come back in the order of ``calls``. The patch embedding runs per token (the map the raster
        path applies to the 5-D latent). Results equal the unpacked calls up to float rounding (fp32 on a CPU:
        within 1e-5 of the output scale, see tests/test_modes_wan.py).

        Compiled blocks: with ``impl`` a compile runner's impl (``impl.packed_calls``; ``StageRunner.packed`` passes
        its ``execution``), the block function runs through ``impl.block("wan_block_packed", ...)`` (compiled with a
        symbolic packed token dimension) on a :class:`PackedSegments` layout (device tensors only; one padding
        segment with at least one text token, CUDA graphs pad the packed lengths up to a bucket): a new mix of
        requests reuses the same graphs.

        Falls back to one :meth:`velocity` per call (correct, unpacked) when ``impl`` is neither None / EAGER nor a
        packing impl, when the calling ``generate`` has a feature cache (its state is per request, and Wan resets it
        at an expert change), or when a block or an attention module carries torch forward (pre-)hooks or diffusers
        hooks.
        """
        calls = check_velocity_calls(calls)
        execution = execution or PackedExecution(self, impl)
        if not can_pack(execution.impl, self._bypassed_by_packing()):
            return [execution.velocity(c) for c in calls]
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(calls):
            groups.setdefault(self.expert_index(c.timestep, c.cond), []).append(i)
        out: list = [None] * len(calls)
        for expert, idx in sorted(groups.items()):
            for i, o in zip(idx, self._packed_call([calls[i] for i in idx], expert, execution)):
                out[i] = o
        return out

    def _packed_call(self, calls: list[VelocityCall], expert: int, execution: PackedExecution) -> list[torch.Tensor]:
        """One packed call of ``expert``'s transformer for ``calls`` (all of that expert)."""
        tr = self._expert(expert, calls[0].cond.data)[0]
        device, dtype = calls[0].tokens.device, calls[0].tokens.dtype
        tokens, fpos, embeds, ts, image_lens, text_lens, batches = [], [], [], [], [], [], []
        for c in calls:
            data = c.cond.data
            b, n = c.tokens.shape[:2]
            texts = [data["negative_embeds"], data["embeds"]] if data["cfg"] else [data["embeds"]]
            pos = self.frame_positions(c.grid).reshape(-1, 3)
            for emb in texts:  # CFG: the unconditional videos first, as the batched pass of velocity
                tokens.append(c.tokens.reshape(-1, c.tokens.shape[-1]))
                fpos.append(pos)
                embeds.append(emb.reshape(-1, emb.shape[-1]))
                ts.append(c.timestep.reshape(()).expand(b))
                image_lens += [n] * b
                text_lens += [emb.shape[1]] * b
            batches.append(b * len(texts))
        tokens, fpos, embeds, t = torch.cat(tokens), torch.cat(fpos), torch.cat(embeds), torch.cat(ts)
        impl, backend = execution.impl, self.packed_attention_backend
        self.rope_frequencies(device)  # the frequency table exists before a capture reads it

        def model(ex, tok, pos, emb, tt):
            rope = tuple(r[None] for r in self.rotary_tables(pos))
            return self._forward(ex, tr, self.embed_patches(tr, tok)[None], emb[None], tt, rope, impl)

        if not execution.static_layout:
            out = model(Packed(HostSegments([image_lens, text_lens], device), backend), tokens, fpos, embeds, t)
        else:
            n_img, n_txt, n_seg = len(tokens), len(embeds), len(image_lens)
            pad_img = execution.pad("image", n_img) - n_img
            # at least one padding text token: the padding segment's image tokens need a key to attend to
            pad_txt = execution.pad("text", n_txt + 1) - n_txt
            segs = execution.pad("segments", n_seg + 1)
            kind = static_attention(backend, device, dtype)
            lay = PackedSegments.build([image_lens, text_lens], [pad_img, pad_txt], segs, device, kind)
            tensors = [pad_rows(tokens, pad_img), pad_rows(fpos, pad_img), pad_rows(embeds, pad_txt),
                       pad_rows(t, segs - n_seg), *lay.tensors()]

            def forward(*xs):  # the flat tensors only (a captured graph replays it for every mix of the same sizes)
                ex = Packed(PackedSegments.from_tensors(xs[4:], 2, kind), backend)
                return model(ex, *xs[:4])

            out = execution.run(("wan", expert, kind, backend), forward, tensors)[:, :n_img]
        results = []
        for c, o in zip(calls, split_calls(out, calls, batches)):
            data = c.cond.data
            if data["cfg"]:
                uncond, text = o.chunk(2)
                o = uncond + self._expert(expert, data)[1] * (text - uncond)
            results.append(o)
        return results

    def baseline_schedule(self, num_steps, image_seq_len):
        """The pipeline's ``scheduler.set_timesteps(num_steps)`` (no mu, no custom sigmas): its timesteps (integers
        for UniPC, given to the model as they are) and flow sigmas ``(N + 1,)``, float32."""
        sched = self.scheduler_copy()
        sched.set_timesteps(num_steps, device=self.device)
        timesteps = sched.timesteps.to(device=self.device, dtype=torch.float32)
        sigmas = sched.sigmas.to(device=self.device, dtype=torch.float32)
        if len(sigmas) != len(timesteps) + 1:
            raise ValueError(f"the pipeline's {type(sched).__name__} gives {len(timesteps)} timesteps and "
                             f"{len(sigmas)} sigmas for {num_steps} steps; ralu needs one sigma more than timesteps")
        return timesteps, sigmas

    def decode(self, latents, impl: ModelImpl | None = None):
        """Latents ``(B, C, F, h, w)`` -> video ``(B, 3, 1 + 4 (F - 1), 8h, 8w)`` in about [-1, 1]: the pipeline's
        de-normalisation (``latents / (1 / latents_std) + latents_mean`` in the VAE's dtype) and ``vae.decode``
        (eager, one call at a time per VAE: its frame loop keeps state on the module)."""
        vae = self.pipe.vae
        z = latents.to(module_device(vae), compute_dtype(vae))
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
        z = z / std + mean
        with vae_lock(vae):
            return vae.decode(z, return_dict=False)[0]

    def edge_images(self, latents, decode):
        """One decoded frame per latent frame (frame ``4 f`` for latent frame ``f``, clipped to the last), stacked
        vertically: ``(B, 3, F H', W')`` for half-resolution latents ``(B, C, F, h, w)``."""
        video = decode(latents)
        f = latents.shape[2]
        t = video.shape[2]
        idx = torch.tensor([min(self.temporal_factor * i, t - 1) for i in range(f)], device=video.device)
        frames = video.index_select(2, idx)
        b, ch, _, hh, ww = frames.shape
        return frames.reshape(b, ch, f * hh, ww)

    def postprocess(self, images, output_type):
        """Video ``(B, 3, T, H, W)`` -> what ``WanPipeline`` returns as ``frames`` for ``output_type``."""
        return self.pipe.video_processor.postprocess_video(images, output_type=output_type)
