"""SD3 / SD3.5 adapter (StableDiffusion3Pipeline / SD3Transformer2DModel): patch embedding per token, sin-cos
position embedding evaluated at each token's own position, classifier-free guidance, skip-layer guidance.

Models: SD3 Medium (24 joint blocks), SD3.5 Large (38 joint blocks, RMSNorm on q/k) and SD3.5 Medium (MMDiT-X:
24 blocks, the first 13 with a second, image-only self-attention; q/k RMSNorm; a 384-cell position table). One
adapter serves them all: the joint blocks are called as the modules they are (:func:`sd3_joint_block`: their
attention processors, q/k norms, dual attention, LoRA layers and hooks run as usual), and positions enter the
model only through its patch embedding.

Positions: SD3 adds a fixed 2-D sin-cos table (centre-cropped to the current token grid) after its patch
embedding. Raster token sets (RALU stages 1 and 3, the baseline) go through the model's own ``pos_embed`` module.
Mixed sets (stage 2: coarse tokens and their children at +{0, 0.5}, per image) go through the patch embedding's
own conv applied to each token's patch (kernel = stride = patch: the same map, one token at a time) plus the
sin-cos formula evaluated at each token's (fractional) index on the coarse crop (:meth:`SD3Adapter.sincos_at`).

Skip-layer guidance (SD3.5 Medium's recommended setting; diffusers' ``skip_guidance_layers`` and friends): set
``get_adapter(pipe).skip_layer_guidance = SkipLayerGuidance(layers=(7, 8, 9))``. It is applied inside
:meth:`SD3Adapter.velocity` by the timestep's place in the model's own (unshifted) time axis, so it works in every
RALU stage; see :class:`SkipLayerGuidance` for how that window relates to diffusers' step-index window.

Refused before any work (:meth:`SD3Adapter.check_supported`): IP-Adapter attention processors (ralu passes no
image embeddings, so the adapter would be silently ignored); diffusers' stateful hooks on the transformer or its
blocks (``enable_cache`` and the like: their state follows the transformer's own forward, which ralu does not
call; group offloading and layerwise casting are stateless per call and allowed); skip-layer guidance naming
layers the model lacks, or with a dynamically shifted scheduler (no single shift defines its window).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from .base import EAGER, Conditioning, DiTAdapter, ModelImpl, SplitBlocks, TokenGrid

# diffusers hooks whose effect is per module call (no state across a transformer forward): allowed on the model
STATELESS_HOOK_PREFIXES = ("group_offloading", "lazy_prefetch_group_offloading", "layerwise_casting",
                           "peft_autocast_disable")


def sd3_joint_block(block, hidden_states, encoder_hidden_states, temb):
    """One ``JointTransformerBlock`` called as the module it is (its processor and hooks run as usual).
    Returns ``(encoder_hidden_states, hidden_states)``; a separate function so a backend can compile it
    without touching the user's module."""
    return block(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb)


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

    family = "sd3"
    default_preset = "3x"
    default_steps = 28
    default_guidance = 7.0
    base_shift = 3.0

    supports_negative_prompt = True
    default_text_len = 77 + 256  # CLIP tokens then T5 tokens

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
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

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
        cfg = guidance_scale > 1
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
    def _forward(self, x: torch.Tensor, grid: TokenGrid, timestep: torch.Tensor, embeds: torch.Tensor,
                 pooled: torch.Tensor, impl: ModelImpl, skip: tuple[int, ...] = (), cached: bool = True):
        """The transformer on tokens ``x (N, L, C p p)`` with text ``embeds (N, T, D_text)`` and ``pooled (N, P)``:
        the model's output as tokens ``(N, L, C p p)``. ``skip``: block indices left out (diffusers'
        ``skip_layers``); ``cached``: run the blocks through the call's feature cache (if any)."""
        tr = self.transformer
        n, l, _ = x.shape
        hidden = self.embed_tokens(x, grid).contiguous()
        temb = tr.time_text_embed(timestep.expand(n), pooled)
        enc = tr.context_embedder(embeds)
        if enc._base is not None:  # a view (Linear on 3-D input): dynamo guards a view input's base, so block 0
            enc = enc.clone()      # would get a graph of its own; every block of a kind shares one graph this way

        stack = [blk for i, blk in enumerate(tr.transformer_blocks) if i not in skip]
        joint = impl.block("sd3_joint", sd3_joint_block)

        def run(state, start, stop):  # blocks [start, stop) on state (encoder, image) hidden states
            e, h = state
            for block in stack[start:stop]:
                e, h = joint(block, h, e, temb)
            return e, h

        def first():
            state = run((enc, hidden), 0, 1)
            return state[1], state

        blocks = SplitBlocks(first, lambda state: run(state, 1, len(stack))[1])
        hidden = self.run_blocks(blocks, hidden, timestep) if cached else blocks()
        out = tr.proj_out(tr.norm_out(hidden, temb))
        p = self.patch_size
        return out.view(n, l, p, p, -1).permute(0, 1, 4, 2, 3).reshape(n, l, -1)

    def velocity(self, tokens, grid, timestep, cond, impl: ModelImpl | None = None):
        impl = impl or EAGER
        data = cond.data
        if not data["cfg"]:
            return self._forward(tokens, grid, timestep, data["embeds"], data["pooled"], impl)
        slg = data.get("slg")
        if slg is not None and _tracing():
            raise NotImplementedError(
                "skip-layer guidance decides per timestep in Python; it cannot run inside a traced or captured model "
                "call (backend='onnx'/'tensorrt', or CUDA graphs): use backend='eager', or 'inductor' with "
                "compile_options={'cuda_graphs': False}")
        g2 = TokenGrid(torch.cat([grid.positions] * 2), grid.grid_hw,
                       None if grid.fine_mask is None else torch.cat([grid.fine_mask] * 2), grid.raster)
        out = self._forward(torch.cat([tokens, tokens]), g2, timestep, data["embeds"], data["pooled"], impl)
        uncond, text = out.chunk(2)
        out = uncond + data["guidance_scale"] * (text - uncond)
        if slg is not None and slg.active(timestep, data["slg_shift"]):  # as diffusers: conditional rows only
            b = cond.batch
            skipped = self._forward(tokens, grid, timestep, data["embeds"][b:], data["pooled"][b:], impl,
                                    skip=slg.layers, cached=False)
            out = out + (text - skipped) * slg.scale
        return out

    def baseline_schedule(self, num_steps, image_seq_len):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

        sched = copy.deepcopy(self.pipe.scheduler)
        kwargs = {}
        if sched.config.get("use_dynamic_shifting", None):
            kwargs["mu"] = calculate_shift(image_seq_len, sched.config.get("base_image_seq_len", 256),
                                           sched.config.get("max_image_seq_len", 4096),
                                           sched.config.get("base_shift", 0.5), sched.config.get("max_shift", 1.16))
        timesteps, _ = retrieve_timesteps(sched, num_steps, self.device, **kwargs)
        return timesteps, sched.sigmas.to(self.device)
