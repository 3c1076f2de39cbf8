"""The model-adapter interface: everything the RALU sampler needs from a diffusion transformer.

An adapter knows its model family (how tokens are packed, how positions enter the model, how the
prompt is encoded, how latents are decoded) and nothing of the sampler's stages. A new DiT is one
file implementing :class:`DiTAdapter`.

Conventions: tokens are ``(B, L, C_tok)`` with ``C_tok = latent_channels * patch_size**2`` in
``(channel, py, px)`` order; latents are ``(B, latent_channels, h, w)``; velocities follow diffusers'
flow-matching convention ``v = noise - data`` with ``x_sigma = (1 - sigma) * data + sigma * noise``.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import logging
import threading
import warnings
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..execution.call import (EAGER, CallState, ModelImpl, call_scope, current_cache,  # noqa: F401 (re-exported)
                              current_call, current_interrupt, current_sharding, not_a_view)
from ..execution.packing import forward_override
from ..offload import check_offload, execution_device, offload_hook, onload

# diffusers hook registry entries that act per module call and keep no state across calls: ralu runs the modules
# that carry them as modules (a family refuses those on modules it decomposes), so they take effect as usual.
STATELESS_HOOK_PREFIXES = ("group_offloading", "lazy_prefetch_group_offloading", "layerwise_casting",
                           "peft_autocast_disable")
# the split / gather hooks of diffusers' enable_parallelism: ralu runs such a model under its config with its own
# sharding (docs/parallelism.md), never through them (ralu_runtime.parallel.plan.call_module skips the gather)
CONTEXT_PARALLEL_HOOK_PREFIXES = ("cp_input---", "cp_output---")


_SCHEDULER_COPIES: contextvars.ContextVar[list | None] = contextvars.ContextVar("ralu_scheduler_copies", default=None)


@contextlib.contextmanager
def scheduler_copies():
    """Collect the scheduler copies :meth:`DiTAdapter.scheduler_copy` makes in this ``with`` block (this thread /
    context): the sampler reads the copy ``baseline_schedule`` configured, to follow its ``step``."""
    got: list = []
    token = _SCHEDULER_COPIES.set(got)
    try:
        yield got
    finally:
        _SCHEDULER_COPIES.reset(token)


_VAE_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_VAE_LOCKS_LOCK = threading.Lock()


def vae_lock(vae) -> threading.Lock:
    """The one lock of ``vae`` (kept by ralu, not on the module): held around every decode of a VAE that keeps state
    on its modules between calls (the causal 3-D VAEs of Qwen-Image, Wan and HunyuanVideo 1.5 cache features per
    call), so two threads (two ``generate`` calls, or the serving engine's final decode and another request's
    preview decode) never run it at once."""
    with _VAE_LOCKS_LOCK:
        lock = _VAE_LOCKS.get(vae)
        if lock is None:
            lock = _VAE_LOCKS[vae] = threading.Lock()
        return lock


@dataclass
class TokenGrid:
    """Where the tokens of one forward pass sit.

    positions: ``(B, L, 2)`` float32 ``(row, col)`` in units of the cells of ``grid_hw``.
    grid_hw: ``(rows, cols)`` of the token grid the positions refer to (the coarse grid in RALU stages 1
        and 2, the fine grid in stage 3 and in the full-resolution baseline).
    fine_mask: ``(B, L)`` bool, True for tokens one level finer than ``grid_hw`` (stage-2 children);
        None when every token is at the grid's own resolution.
    raster: True when the tokens are exactly the grid in raster order (stage 1, stage 3, baseline), so an
        adapter may use the model's native full-grid path.
    frames: latent frames stacked in the grid (video adapters; 1 for images). A video is a tall image: frame ``f``
        holds rows ``[f R, (f + 1) R)`` with ``R = grid_hw[0] // frames``, so a token at row ``r`` is in frame
        ``r // R`` at row ``r - frame R`` (half-integer rows of stage-2 children stay inside their frame).
    """

    positions: torch.Tensor
    grid_hw: tuple[int, int]
    fine_mask: torch.Tensor | None = None
    raster: bool = False
    frames: int = 1


def call_with_hooks(module: torch.nn.Module, fn: Callable, args: tuple, hook_kwargs: dict):
    """``fn(*args)`` in place of ``module(**hook_kwargs)``, with the module's torch forward pre-hooks and forward
    hooks run around it as ``Module.__call__`` would for a keyword-only call (positional args ``()``).

    For adapters that run a block's layers themselves: hooks that observe (counters, probes) keep working.
    A hook that returns a replacement input or output cannot be honoured: NotImplementedError.
    """
    pre, post = module._forward_pre_hooks, module._forward_hooks
    if not pre and not post:
        return fn(*args)
    name = type(module).__name__
    for hid, hook in list(pre.items()):
        r = hook(module, (), hook_kwargs) if hid in module._forward_pre_hooks_with_kwargs else hook(module, ())
        if r is not None:
            raise NotImplementedError(f"a forward pre-hook on {name} returned new inputs; ralu runs this block's "
                                      "layers itself and cannot apply hooks that change its inputs")
    out = fn(*args)
    for hid, hook in list(post.items()):
        if hid in module._forward_hooks_with_kwargs:
            r = hook(module, (), hook_kwargs, out)
        else:
            r = hook(module, (), out)
        if r is not None and r is not out:  # a hook that returns the output it was given changes nothing
            raise NotImplementedError(f"a forward hook on {name} returned a new output; ralu runs this block's "
                                      "layers itself and cannot apply hooks that change its output")
    return out


_WARNED_HOOKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> hook ids warned about


def _warn_model_hooks(where: str, model: torch.nn.Module) -> None:
    """A warning (once per model and set of hooks) that torch forward hooks on the transformer itself do not run
    under ralu, which never calls its forward: they often only observe diffusers' calls (counting, timing), so they
    are not refused; a hook that changes the output would be skipped."""
    ids = frozenset(map(id, (*model._forward_hooks.values(), *model._forward_pre_hooks.values())))
    if _WARNED_HOOKS.get(model) == ids:
        return
    _WARNED_HOOKS[model] = ids
    warnings.warn(f"{where} has {len(ids)} forward hook(s) (register_forward_hook / _pre_hook) on the model itself: "
                  "ralu never calls its forward (it runs the embeddings, blocks and output layers itself), so they "
                  "do not run in ralu's calls. Hooks on blocks and layers do.", stacklevel=4)


def check_blocks(blocks, allowed: tuple[str, ...], model: str, *, attn: str = "attn") -> None:
    """Refuse (ValueError, before any work) what running a model's blocks ourselves would bypass or run wrongly.

    blocks: ``(name, block module)`` pairs; ``block.<attn>`` must carry one of the attention processor classes
    ``allowed`` (by name), and the block no diffusers hook registry (``enable_cache``, block-level offloading).
    ``model``: the family's display name for the messages."""
    for name, block in blocks:
        proc = type(getattr(getattr(block, attn), "processor", None)).__name__
        if proc not in allowed:
            raise ValueError(f"{name}.{attn} has attention processor {proc}; ralu runs {model} attention itself and "
                             f"supports only diffusers' {' / '.join(allowed)} (no IP-Adapter or custom processors): "
                             f"restore it with pipe.transformer.set_attn_processor({allowed[0]}())")
        names = [str(h) for h in (getattr(getattr(block, "_diffusers_hook", None), "hooks", None) or {})]
        if names and all(h.startswith(("group_offloading", "lazy_prefetch_group_offloading")) for h in names):
            raise ValueError(f"{name} carries diffusers' group offloading hooks ({', '.join(names)}): block-level "
                             "offloading, or leaf-level on a block that holds parameters of its own (Wan's "
                             f"scale_shift_table); ralu runs the {model} blocks' layers itself and reads those "
                             "parameters directly, so they would stay offloaded. Use offloading without a hook on "
                             "the blocks, or keep the transformer on its device")
        if names:
            raise ValueError(f"{name} carries diffusers hooks ({', '.join(names)}: e.g. enable_cache "
                             f"or block-level group offloading); ralu runs the {model} blocks' layers itself and "
                             "would bypass them. Remove them (pipe.transformer.disable_cache(), leaf-level or no "
                             "offloading) and use generate(cache=...) for temporal caching")


def named_blocks(transformer, *kinds: str):
    """``(f"{kind}.{i}", block)`` for the block lists ``kinds`` of ``transformer``."""
    return [(f"{kind}.{i}", b) for kind in kinds for i, b in enumerate(getattr(transformer, kind))]


class SplitBlocks:
    """A transformer block stack split after its first block, for first-block caches.

    ``first()`` runs block 0 and returns ``(image hidden after block 0, state)``; ``rest(state)`` runs the other
    blocks and returns the final image hidden states. Calling the object runs both (the whole stack), so it
    can be passed wherever a plain ``blocks_fn`` is expected.
    """

    def __init__(self, first, rest):
        self.first, self.rest = first, rest

    def __call__(self):
        return self.rest(self.first()[1])


def _without_views(state):
    if isinstance(state, (tuple, list)):
        return type(state)(_without_views(s) for s in state)
    return not_a_view(state) if isinstance(state, torch.Tensor) else state


class BlockStack(SplitBlocks):
    """A family's block stack in an execution mode, for :meth:`DiTAdapter.run_stack`.

    ``run(state, start, stop) -> state`` runs blocks ``[start, stop)`` of ``n`` from ``state0``; ``image(state)``
    is the image hidden states of a state (this mode's rows). Seen from a feature cache (a :class:`SplitBlocks`),
    outputs are whole-request tensors: ``ex.whole(..., stream)`` gathers a sharded mode's rows (identity otherwise),
    so every rank holds the same cache state and takes the same full / cached decision.

    Inside an :func:`~ralu_runtime.execution.call.interrupt_scope` (the serving engine's requests) the stack runs
    one block at a time with the scope's check before each block, so a cancelled or expired request stops within
    one block.

    ``state0``'s tensors (nested in tuples and lists) enter the first block as tensors that are not views
    (:func:`~ralu_runtime.execution.call.not_a_view`): every block of a kind then shares one compiled graph."""

    def __init__(self, run, n: int, state0, image, ex, stream: int):
        check = current_interrupt()
        if check is not None:
            whole = run

            def run(state, start, stop):
                for i in range(start, stop):
                    check()
                    state = whole(state, i, i + 1)
                return state

        self.run, self.n, self.image, self.ex, self.stream = run, n, image, ex, stream
        self.state0 = _without_views(state0)
        super().__init__(self._first, self._rest)

    def local(self):
        """Run the whole stack; the image hidden states on this mode's rows (no gather)."""
        return self.image(self.run(self.state0, 0, self.n))

    def _first(self):
        state = self.run(self.state0, 0, 1)
        return self.ex.whole(self.image(state), self.stream), state

    def _rest(self, state):
        return self.ex.whole(self.image(self.run(state, 1, self.n)), self.stream)

    def __call__(self):
        return self.ex.whole(self.local(), self.stream)


def double_then_single_stack(ex, n_double: int, n_single: int, double_step: Callable, single_step: Callable,
                             text: torch.Tensor, image: torch.Tensor, stream: int) -> BlockStack:
    """The :class:`BlockStack` of a FLUX-style transformer (FLUX.1, FLUX.2) in mode ``ex``: ``n_double``
    double-stream blocks on ``(text, image)``, then ``n_single`` single-stream blocks on the joined sequence
    ``ex.join(text, image)``.

    ``double_step(i, text, image) -> (text, image)`` runs double block ``i``; ``single_step(j, joined) -> joined``
    runs single block ``j``. Hidden states are ``(B, T, D)`` text and ``(B, L, D)`` image rows in ``ex``'s layout.
    The joined sequence enters the first single block as a tensor that is not a view
    (:func:`~ralu_runtime.execution.call.not_a_view`), so every single block shares one compiled graph. ``stream``:
    the image stream's index for ``ex.whole``."""
    text_len = text.shape[1]

    def run(state, start, stop):  # blocks [start, stop) on (text, image, joined-or-None)
        e, h, x = state
        for i in range(start, stop):
            if i < n_double:
                e, h = double_step(i, e, h)
                continue
            if x is None:
                x = not_a_view(ex.join(e, h))
            x = single_step(i - n_double, x)
        return e, h, x

    def image_rows(state):
        e, h, x = state
        return h if x is None else ex.split(x, text_len)[1]

    return BlockStack(run, n_double + n_single, (text, image, None), image_rows, ex, stream)


def side_by_side(stacks: Sequence[BlockStack], rows, stream: int) -> BlockStack:
    """Block stacks of one depth, one per model batch of a call (Chroma's CFG halves when their text lengths or
    masks differ), run as one :class:`BlockStack`: block ``i`` of every stack in turn, then block ``i + 1``. Its
    state is the list of the stacks' states, its image the list of their image rows (each in its own mode); ``rows``
    is what a feature cache sees as the call's mode: ``whole(parts, stream)`` / ``local(x, stream)`` over such lists.
    """
    n = stacks[0].n
    if any(s.n != n for s in stacks):
        raise ValueError(f"side_by_side: stacks of different depths {[s.n for s in stacks]}")

    def run(states, start, stop):
        for i in range(start, stop):
            states = [s.run(state, i, i + 1) for s, state in zip(stacks, states)]
        return states

    def image(states):
        return [s.image(state) for s, state in zip(stacks, states)]

    return BlockStack(run, n, [s.state0 for s in stacks], image, rows, stream)


@dataclass
class Conditioning:
    """Encoded prompts of a batch of ``batch`` images; ``data`` is adapter-specific."""

    batch: int
    data: dict[str, Any]


@dataclass
class VelocityCall:
    """One request's model call: tokens (B, L, C_tok), grid (TokenGrid), timestep 0-dim float32 (1000*sigma), cond.

    The arguments of one :meth:`DiTAdapter.velocity` call, for :meth:`DiTAdapter.packed_velocity`.
    """

    tokens: torch.Tensor
    grid: TokenGrid
    timestep: torch.Tensor
    cond: Conditioning


def check_velocity_calls(calls: Sequence[VelocityCall]) -> list[VelocityCall]:
    """The calls of one :meth:`DiTAdapter.packed_velocity` as a list, checked before any work.

    ValueError when the list is empty, a call's tokens are not ``(B, L, C)`` with ``B, L >= 1``, its grid positions
    are not ``(B, L, 2)`` (its fine mask, if any, not ``(B, L)``), its timestep has more than one element, its
    ``cond.batch`` is not ``B``, or the calls' tokens, positions and timesteps are not all on one device and the
    tokens not all of one dtype (one packed model call runs on one device in one dtype). TypeError for objects
    that are not VelocityCall / TokenGrid / Conditioning / tensors.
    """
    if isinstance(calls, VelocityCall):
        raise TypeError("packed_velocity takes a sequence of VelocityCall (got a single VelocityCall: wrap it in "
                        "a list)")
    calls = list(calls)
    if not calls:
        raise ValueError("packed_velocity needs at least one VelocityCall; got an empty sequence")
    device = dtype = None
    for i, c in enumerate(calls):
        if not isinstance(c, VelocityCall):
            raise TypeError(f"calls[{i}] is {type(c).__name__}, not a VelocityCall")
        if not isinstance(c.tokens, torch.Tensor) or c.tokens.ndim != 3 or 0 in c.tokens.shape[:2]:
            shape = tuple(c.tokens.shape) if isinstance(c.tokens, torch.Tensor) else type(c.tokens).__name__
            raise ValueError(f"calls[{i}].tokens must be a (B, L, C_tok) tensor with B, L >= 1; got {shape}")
        b, l, _ = c.tokens.shape
        if not isinstance(c.grid, TokenGrid) or not isinstance(c.grid.positions, torch.Tensor):
            raise TypeError(f"calls[{i}].grid must be a TokenGrid; got {type(c.grid).__name__}")
        if tuple(c.grid.positions.shape) != (b, l, 2):
            raise ValueError(f"calls[{i}].grid.positions has shape {tuple(c.grid.positions.shape)}; its tokens "
                             f"{tuple(c.tokens.shape)} need ({b}, {l}, 2)")
        if c.grid.fine_mask is not None and tuple(c.grid.fine_mask.shape) != (b, l):
            raise ValueError(f"calls[{i}].grid.fine_mask has shape {tuple(c.grid.fine_mask.shape)}; need ({b}, {l})")
        if not isinstance(c.timestep, torch.Tensor) or c.timestep.numel() != 1:
            what = tuple(c.timestep.shape) if isinstance(c.timestep, torch.Tensor) else type(c.timestep).__name__
            raise ValueError(f"calls[{i}].timestep must be a 0-dim tensor (1000 * sigma); got {what}")
        if not isinstance(c.cond, Conditioning):
            raise TypeError(f"calls[{i}].cond must be a Conditioning; got {type(c.cond).__name__}")
        if c.cond.batch != b:
            raise ValueError(f"calls[{i}]: cond.batch = {c.cond.batch} but its tokens have batch {b}")
        if device is None:
            device, dtype = c.tokens.device, c.tokens.dtype
        if c.tokens.device != device or c.tokens.dtype != dtype:
            raise ValueError(f"calls[{i}].tokens are {c.tokens.dtype} on {c.tokens.device} but calls[0].tokens are "
                             f"{dtype} on {device}: one packed call runs on one device in one dtype")
        for name, t in (("grid.positions", c.grid.positions), ("timestep", c.timestep)):
            if t.device != device:
                raise ValueError(f"calls[{i}].{name} is on {t.device}, the tokens on {device}: put every tensor of "
                                 "the packed calls on one device")
    return calls


def scheduler_base_shift(config, image_seq_len: int, mu: float | None = None) -> float:
    """The shift h of a diffusers ``FlowMatchEulerDiscreteScheduler`` ``config`` at ``image_seq_len`` tokens, such that
    its sigmas are ``h s / (1 + (h - 1) s)`` of the unshifted ``s``: ``config.shift`` without dynamic shifting; with
    it, ``exp(mu)`` ("exponential" time shift) or ``mu`` ("linear"), where ``mu`` is given (pipelines with their own
    formula, e.g. FLUX.2) or diffusers' ``calculate_shift`` line through (base_image_seq_len, base_shift) and
    (max_image_seq_len, max_shift)."""
    get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
    if not get("use_dynamic_shifting", False):
        return float(get("shift", 1.0))
    if mu is None:
        x0, x1 = get("base_image_seq_len", 256), get("max_image_seq_len", 4096)
        y0, y1 = get("base_shift", 0.5), get("max_shift", 1.15)
        mu = y0 + (y1 - y0) / (x1 - x0) * (image_seq_len - x0)
    return float(np.exp(mu)) if get("time_shift_type", "exponential") == "exponential" else float(mu)


def pipeline_mu(calculate_shift, config, image_seq_len: int, *, max_shift: float = 1.15) -> float:
    """``mu`` of a pipeline's dynamic shifting at ``image_seq_len`` tokens: the pipeline module's own
    ``calculate_shift`` on the scheduler ``config``'s line, with the pipeline's defaults for missing keys (256 / 4096
    tokens, shifts 0.5 / ``max_shift``: 1.15, SD3's pipelines 1.16). Calling the pipeline's function keeps its float
    evaluation order, so the sigmas equal the pipeline's bitwise."""
    get = config.get
    return calculate_shift(image_seq_len, get("base_image_seq_len", 256), get("max_image_seq_len", 4096),
                           get("base_shift", 0.5), get("max_shift", max_shift))


def layerwise_casting(module: torch.nn.Module):
    """diffusers' layerwise-casting hook on ``module`` itself (``enable_layerwise_casting``: ``storage_dtype``,
    ``compute_dtype``), or None."""
    registry = vars(module).get("_diffusers_hook")
    return None if registry is None else registry.hooks.get("layerwise_casting")


def _count_cast(found: tuple, where: str, module: torch.nn.Module) -> tuple:
    """``found`` = ``(first layerwise-cast module's name, (first one stored in a float8 dtype, that dtype))``, each
    None until seen, updated with ``module`` named ``where`` (a walk calls it once per module, in order)."""
    cast = layerwise_casting(module)
    if cast is None:
        return found
    cast_at, stored = found
    if stored is None and cast.storage_dtype.itemsize == 1:
        stored = (where, cast.storage_dtype)
    return cast_at or where, stored


def compute_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype ``model`` computes in, from its first parameter: that parameter's dtype, or the compute dtype of
    diffusers' layerwise casting where that stores it in another (a float8 / bfloat16 storage dtype). None for a
    model without parameters. A shortcut for diffusers' ``model.dtype``, which walks every module."""
    for name, p in model.named_parameters():
        cast = layerwise_casting(model.get_submodule(name.rpartition(".")[0]))
        return cast.compute_dtype if cast is not None else p.dtype
    return None


class DiTAdapter(ABC):
    """Base class of model adapters.

    Class attributes a subclass sets: ``family`` (preset family name), ``default_steps`` and
    ``default_guidance`` (the pipeline's own defaults), ``default_preset`` (preset used for speedup="default"), ``base_shift`` (h_ori, the model's timestep shift
    used by NT-Matching).
    """

    family: str = ""
    default_preset: str = "7x"
    default_steps: int = 28
    default_guidance: float = 3.5
    base_shift: float = 3.0
    default_size: int = 1024                 # pixels per side when generate gets no height / width
    default_text_len: int = 512              # text tokens of an encoded prompt (warm-up's dummy embeddings)
    max_side_px: int | None = None           # largest height / width in pixels (None: no fixed limit known)
    supports_negative_prompt: bool = False   # classifier-free guidance with negative prompts
    takes_prompt_mask: bool = False          # encode_prompt accepts prompt_embeds_mask (B, T) with prompt_embeds
    takes_max_sequence_length: bool = True   # the pipeline's text length is generate's max_sequence_length
    is_video: bool = False                   # latents (B, C, F, h, w); generate takes num_frames
    default_frames: int | None = None        # video: the pipeline's default num_frames
    temporal_factor: int = 1                 # video: VAE temporal compression (num_frames = 1 + k * factor)
    fuses_projections: bool = False          # velocity asks ModelImpl.fused for q/k/v weights (ralu-owned fusion)
    onnx_refusal: str | None = None          # why backend="onnx" cannot export this family's model call (None: it can)
    runs_block_modules: bool = False         # one-request calls call the blocks as modules (their forward runs)
    bypassed_modules: tuple[str, ...] = ()   # block children ralu runs itself, never calling them (their hooks)

    def __init__(self, pipe, *, weak: bool = False):
        # weak: hold the pipeline by weak reference (the adapter table in ralu_runtime.adapters is keyed by the
        # pipeline; a strong reference from the value would keep every pipeline alive for good)
        self._pipe_ref = weakref.ref(pipe) if (weak and pipe is not None) else None
        self._pipe = None if self._pipe_ref is not None else pipe
        # default temporal cache for calls that pass cache=None (set by ralu_runtime.cache.set_cache); each call
        # runs with its own cache (see call_scope), so concurrent calls never share or swap one
        self.feature_cache = None
        self.runner = None  # the installed compile backend (ralu_runtime.compile.StageRunner), if any
        self._components = self.read_components()

    @property
    def pipe(self):
        """The diffusers pipeline this adapter runs (None for adapters that are their own model)."""
        if self._pipe_ref is None:
            return self._pipe
        pipe = self._pipe_ref()
        if pipe is None:
            raise RuntimeError("this adapter's pipeline no longer exists: adapters from get_adapter() hold their "
                               "pipeline weakly (so that ralu never keeps a pipeline alive); keep a reference to the "
                               "pipeline, or build the adapter class directly (e.g. FluxAdapter(pipe))")
        return pipe

    def read_components(self) -> tuple:
        """The pipeline's components this adapter depends on, as they are now (transformer, VAE)."""
        if self.pipe is None:
            return ()
        return (getattr(self.pipe, "transformer", None), getattr(self.pipe, "vae", None))

    def model_modules(self) -> list[torch.nn.Module]:
        """The modules a model call runs (the transformer; Wan 2.2: both experts): what compiled and captured
        artifacts and ralu's weight copies are checked against before each call (:func:`ralu_runtime.compile.
        model_state`)."""
        model = getattr(self.pipe, "transformer", None) if self.pipe is not None else None
        return [] if model is None else [model]

    def enable_layerwise_casting(self, storage_dtype: torch.dtype, compute_dtype: torch.dtype) -> None:
        """diffusers' ``enable_layerwise_casting(storage_dtype, compute_dtype)`` on every model module
        (:meth:`model_modules`: Wan 2.2's two experts too): their Linear / Conv weights kept in ``storage_dtype``,
        each layer cast to ``compute_dtype`` while it runs. For a pipeline the caller loaded itself (``ralu
        generate / serve --storage-dtype``)."""
        for model in self.model_modules():
            model.enable_layerwise_casting(storage_dtype=storage_dtype, compute_dtype=compute_dtype)

    def components(self) -> tuple:
        """The components this adapter was built for; when :meth:`read_components` differs (e.g.
        ``pipe.transformer = other``), :func:`ralu_runtime.adapters.get_adapter` builds a new adapter."""
        return self._components

    def guidance_ignored(self) -> str | None:
        """Why this model runs no guidance whatever ``guidance_scale`` says (None: it uses it); ``prepare`` logs a
        warning when a call gives one above 1, as the model's diffusers pipeline does."""
        return None

    def runs_cfg(self, guidance_scale: float, negative: bool) -> bool:
        """Whether a call with this ``guidance_scale`` (and ``negative``: a negative prompt or its embeddings given)
        runs classifier-free guidance, i.e. two velocity rows per image and a negative prompt that counts; the rule
        of the model's diffusers pipeline (here: ``guidance_scale > 1`` on a family with negative prompts).
        ``encode_prompt`` decides with it, ``prepare`` warns with it and the serving engine sizes work with it."""
        return self.supports_negative_prompt and guidance_scale > 1

    def latent_frames(self, num_frames: int | None) -> int:
        """Latent frames of a ``num_frames`` video (the pipelines' ``(num_frames - 1) // temporal_factor + 1``);
        1 for an image (``num_frames`` None)."""
        return 1 if num_frames is None else (int(num_frames) - 1) // self.temporal_factor + 1

    def max_latent_frames(self) -> int | None:
        """Video: the most latent frames the model's position tables cover (None: no fixed limit known)."""
        return None

    def guidance_default(self) -> float:
        """The guidance scale of a call that gives none: :attr:`default_guidance` (adapters whose pipeline keeps it
        elsewhere read it there at each call)."""
        return self.default_guidance

    # what a user sets on an adapter (set_cache, SD3.5's skip_layer_guidance, Wan 2.2's guidance_scale_2): kept when
    # a replaced component makes get_adapter build a new adapter for the same pipeline (take_settings)
    user_settings: tuple[str, ...] = ("feature_cache",)

    def take_settings(self, old: "DiTAdapter") -> None:
        """Carry ``old``'s :attr:`user_settings` and its installed backend (the same options, built anew for the
        new components: the runner's ``install_copy_on``) over to this adapter, which replaces it
        for the same pipeline (``pipe.transformer = other``...). ``old`` is left as it is: a call already running
        on it finishes there."""
        for name in self.user_settings:
            setattr(self, name, getattr(old, name))
        if old.runner is not None:
            old.runner.install_copy_on(self)

    def check_supported(self) -> None:
        """Raise ValueError when the model is in a state this adapter cannot run faithfully (before any work)."""

    def check_forwards(self) -> None:
        """ValueError (before any work) when a model call would bypass a ``forward`` the user put in place: ralu
        never calls the transformer's own ``forward`` (it runs its embeddings, blocks and output layers itself), nor
        a block's unless :attr:`runs_block_modules`; blocks are the members of the transformer's ``ModuleList``
        children. What counts: :func:`~ralu_runtime.execution.packing.forward_override` (an instance forward, an
        accelerate offload hook, a class forward from outside diffusers). Packed and sharded calls, which decompose
        more modules, fall back to per-call execution or refuse on their own checks. diffusers' layerwise casting
        runs (its hooks sit on leaf layers, which ralu calls as modules), unless the installed backend traces the
        model (:meth:`check_layerwise_casting`); so does diffusers' model offload (an accelerate ``CpuOffload`` hook
        on a model module: ralu does its work, :mod:`ralu_runtime.offload`) with an eager backend
        (:func:`~ralu_runtime.offload.check_offload`)."""
        found = (None, None)  # the first layerwise-cast module; the first one stored in a float8 dtype
        for name, model in self.named_model_modules():
            mods = [(name, model)]
            if not self.runs_block_modules:
                mods += [(f"{name}.{kind}.{i}", blk) for kind, child in model.named_children()
                         if isinstance(child, torch.nn.ModuleList) for i, blk in enumerate(child)]
            if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
                raise ValueError(f"{name} is a torch.compile'd module (OptimizedModule); ralu runs the "
                                 f"{self.family or 'model'} transformer's layers itself, so its compiled forward "
                                 f"would never run. Give ralu the model itself (pipe.{name} = pipe.{name}._orig_mod) "
                                 "and compile through ralu: generate(backend='inductor')")
            compiled = [where for where, mod in mods if mod._compiled_call_impl is not None]
            if compiled and not getattr(self, "_warned_compiled", False):
                self._warned_compiled = True  # once per adapter (a serving engine calls this per request)
                logging.getLogger("ralu").warning(
                    "%s %s compiled in place (module.compile() / compile_repeated_blocks()); ralu runs the %s "
                    "transformer's layers itself, so that compiled code is never used (results are unchanged): "
                    "compile through ralu instead, generate(backend='inductor')", ", ".join(compiled[:3])
                    + (f" and {len(compiled) - 3} more" if len(compiled) > 3 else ""),
                    "is" if len(compiled) == 1 else "are", self.family or "model")
            for where, mod in mods:
                if mod is model and offload_hook(model) is not None:
                    continue  # enable_model_cpu_offload: ralu does its hook's work (ralu_runtime.offload)
                what = forward_override(mod)
                if what is not None:
                    raise ValueError(f"{where} runs {what}; ralu runs the {self.family or 'model'} transformer's "
                                     "layers itself and would bypass it. Restore the module's own forward to use "
                                     "ralu (to offload, use pipe.enable_model_cpu_offload(), which ralu runs, or "
                                     "move the pipeline to its device); for temporal caching use "
                                     "generate(cache=...)")
            for where, mod in model.named_modules(prefix=name):
                hooked = mod._forward_hooks or mod._forward_pre_hooks
                if hooked and mod is model:
                    _warn_model_hooks(where, mod)
                elif hooked and where.rpartition(".")[2] in self.bypassed_modules:
                    raise ValueError(f"{where} has forward hooks (register_forward_hook / _pre_hook) on an attention "
                                     f"module that ralu runs itself ({self.family or 'model'} attention: its forward "
                                     "does not run, hooks on its layers such as to_q do): they would not run. Remove "
                                     "them (handle.remove()) to use ralu, or put them on a module that runs (a "
                                     "block, a layer)")
                registered = [str(h) for h in (getattr(vars(mod).get("_diffusers_hook"), "hooks", None) or {})]
                found = _count_cast(found, where, mod)
                hooks = [h for h in registered
                         if not h.startswith(STATELESS_HOOK_PREFIXES + CONTEXT_PARALLEL_HOOK_PREFIXES)]
                if hooks:
                    raise ValueError(f"{where} carries diffusers hooks ({', '.join(hooks)}: e.g. "
                                     f"{name}.enable_cache(...) with a PyramidAttentionBroadcast / FasterCache / "
                                     "TaylorSeerCache / TextKVCache / FirstBlockCache / MagCache / SeaCache config, or "
                                     "apply_layer_skip); their state follows diffusers' own denoising loop and "
                                     "forwards, which ralu does not run, so they would be bypassed. Remove them "
                                     f"(pipe.{name}.disable_cache(), HookRegistry.remove_hook) and use "
                                     "generate(cache=...) for temporal caching")
        cast_at = found[0]
        applied = getattr(self.runner, "applied", None) or {}
        if applied:
            check_offload(self, backend=self.runner.options.backend, cuda_graphs=bool(applied.get("cuda_graphs")),
                          compile_vae=bool(applied.get("compile_vae")), fused_qkv=bool(applied.get("fused_qkv")),
                          fp8=applied.get("precision") == "fp8")
        if applied and (cast_at is not None or applied.get("compile_vae")):
            backend = self.runner.options.backend
            self.check_layerwise_casting(
                f"backend={backend!r}" if backend in ("onnx", "tensorrt") else
                "cuda_graphs=True" if applied.get("cuda_graphs") else None,
                "compile_vae" if applied.get("compile_vae") else None, fp8=applied.get("precision") == "fp8",
                compiled_blocks=bool(applied.get("compiled_blocks")), found=found)
        if hasattr(self.runner, "note_layerwise_casting"):  # compiled blocks run cast shadows while it is present
            self.runner.note_layerwise_casting(cast_at is not None)

    def onload_models(self, timestep, cond) -> None:
        """Before a model call at ``timestep``: move the model(s) it runs to their device where diffusers' model
        offload keeps them on the CPU (:func:`ralu_runtime.offload.onload`; nothing without offload). Every one of
        :meth:`model_modules`; a family with one model per timestep (Wan 2.2's experts) onloads that one."""
        for model in self.model_modules():
            onload(model)

    def named_model_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """``(pipeline attribute name, module)`` of each of :meth:`model_modules` ("transformer" for one the
        pipeline does not hold by name)."""
        names = {id(v): k for k, v in vars(self.pipe).items()} if self.pipe is not None else {}
        return [(names.get(id(m), "transformer"), m) for m in self.model_modules()]

    def layerwise_cast_modules(self) -> tuple[str | None, tuple[str, torch.dtype] | None]:
        """``(first module with diffusers' layerwise casting, (first one stored in a float8 dtype, that dtype))`` in
        :meth:`model_modules`, each None where there is none: one walk over every module."""
        found = (None, None)
        for name, model in self.named_model_modules():
            for where, mod in model.named_modules(prefix=name):
                found = _count_cast(found, where, mod)
        return found

    def check_layerwise_casting(self, model_traced_by: str | None, vae_traced_by: str | None = None, *,
                                fp8: bool = False, compiled_blocks: bool = False, found: tuple | None = None) -> None:
        """ValueError when diffusers' layerwise casting (``enable_layerwise_casting``: hooks that cast each layer's
        weights to the compute dtype around its forward) sits on a model that ralu would trace in a way it cannot
        run: the transformer under ``model_traced_by`` (e.g. "backend='onnx'", "cuda_graphs=True"; None: neither
        exported nor captured), the VAE under ``vae_traced_by`` ("compile_vae" or None). torch.compile cannot trace
        those hooks (they build Parameters), nor can export or CUDA-graph capture replay them. ``compiled_blocks``:
        the blocks are compiled (``backend="inductor"``), which runs their cast Linear layers as
        :class:`~ralu_runtime.compile.cast_layers.CastLinear` (traceable): refused where a block holds a cast layer of
        another kind, or with ``fp8``. Eager calls run the hooks as diffusers does. ``fp8``: precision="fp8" is
        asked for, which quantizes weights stored in float32 / bfloat16 / float16 only: refused where the casting
        stores a layer's weights in a float8 dtype (that layer would run in the compute dtype, not in fp8).
        ``found``: :meth:`layerwise_cast_modules` if the caller has it already (walked here otherwise, when
        needed)."""
        if found is None and (fp8 or model_traced_by is not None or compiled_blocks):
            found = self.layerwise_cast_modules()
        cast_at, stored = found or (None, None)
        if fp8 and stored is not None:
            raise ValueError(f"precision='fp8' with {stored[0]} stored in {stored[1]} by diffusers' layerwise "
                             "casting: ralu's fp8 quantizes weights stored in float32 / bfloat16 / float16, so "
                             "such layers would run in the compute dtype, not in fp8. Use one of the two: "
                             "precision='fp8' on a model without float8 storage, or the layerwise casting alone")
        if model_traced_by is not None and cast_at is not None:
            raise ValueError(f"{cast_at} carries diffusers' layerwise casting (enable_layerwise_casting), which "
                             f"{model_traced_by} cannot run: its hooks cast the weights while the model runs "
                             "(export and CUDA graphs cannot replay them). Use backend='eager', or "
                             "backend='inductor' with compile_options={'cuda_graphs': False}, or load the model in "
                             "the dtype it computes in (precision='fp8' quantizes it for you)")
        if compiled_blocks and cast_at is not None:
            if fp8:
                raise ValueError(f"{cast_at} carries diffusers' layerwise casting: precision='fp8' with a compiled "
                                 "backend does not run on a cast model; use one of the two, or backend='eager'")
            for name, model in self.named_model_modules():
                for kind, child in model.named_children():
                    if not isinstance(child, torch.nn.ModuleList):
                        continue
                    for where, mod in child.named_modules(prefix=f"{name}.{kind}"):
                        if layerwise_casting(mod) is not None and type(mod) is not torch.nn.Linear:
                            raise ValueError(
                                f"{where} ({type(mod).__name__}) carries diffusers' layerwise casting inside a "
                                "block; a compiled backend runs the blocks' cast torch.nn.Linear layers only. Leave "
                                "it uncast (enable_layerwise_casting's skip_modules_pattern, whose default skips "
                                "norms) or use backend='eager'")
        vae = getattr(self.pipe, "vae", None) if self.pipe is not None else None
        if vae_traced_by is not None and isinstance(vae, torch.nn.Module):
            where = next((f"vae.{n}" if n else "vae" for n, mod in vae.named_modules()
                          if layerwise_casting(mod) is not None), None)
            if where is not None:
                raise ValueError(f"{where} carries diffusers' layerwise casting (enable_layerwise_casting), which "
                                 f"{vae_traced_by}=True cannot compile (torch.compile cannot trace its hooks); "
                                 "leave compile_vae off")

    # ---- temporal-cache hooks ----------------------------------------------------------------------------
    def begin_stage(self) -> None:
        """Called by the sampler at the start of every stage: the token set changes, caches are invalid."""
        cache = current_cache()
        if cache is not None:
            cache.reset()

    def run_blocks(self, blocks_fn, hidden: torch.Tensor, timestep: torch.Tensor):
        """Run the transformer's block stack ``blocks_fn()`` -> image hidden states, through the calling
        ``generate``'s feature cache if it has one.

        ``blocks_fn`` may be a :class:`SplitBlocks` (first block / remaining blocks), which first-block caches need.
        """
        cache = current_cache()
        if cache is None:
            return blocks_fn()
        return cache(blocks_fn, hidden, timestep)

    def run_stack(self, stack: BlockStack, hidden: torch.Tensor, timestep) -> torch.Tensor:
        """Run a :class:`BlockStack` -> image hidden states on the stack's mode's rows, through the calling
        ``generate``'s feature cache if it has one (one-request modes only: a packed call never runs with a cache).
        ``hidden``: the stack's image input on those rows; ``timestep``: the call's 0-dim timestep."""
        cache = current_cache()
        if cache is None or not stack.ex.per_request:
            return stack.local()
        ex, s = stack.ex, stack.stream
        return ex.local(cache(stack, ex.whole(hidden, s), timestep), s)

    def specialize_call(self, timestep, cond: Conditioning) -> Conditioning:
        """``cond`` with any choice this call makes on the host from ``timestep`` fixed as a constant (e.g. Wan 2.2's
        expert), so compiled graphs, CUDA graphs and exported engines are keyed by it. Identity by default."""
        return cond

    # ---- geometry ------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def patch_size(self) -> int:
        """Latent pixels per token side."""

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel: the pipeline's own ``vae_scale_factor`` (video pipelines: override with
        their spatial factor)."""
        return int(self.pipe.vae_scale_factor)

    @property
    @abstractmethod
    def latent_channels(self) -> int: ...

    @property
    def token_channels(self) -> int:
        return self.latent_channels * self.patch_size**2

    @property
    def coarse_block_px(self) -> int:
        """Image pixels per side of one coarse (stage-1) token: height and width must be multiples."""
        return 2 * self.patch_size * self.vae_scale_factor

    def _first_parameter(self):
        """The transformer's first parameter, or None where diffusers hooks (e.g. group offloading) decide the
        execution device. diffusers' own ``.device`` / ``.dtype`` walk every submodule looking for offload hooks:
        ~10 ms per call on FLUX.1-dev, read several times per image, so the plain case takes this shortcut."""
        tr = self.pipe.transformer
        if getattr(tr, "_diffusers_hook", None) is not None:
            return None
        return next(tr.parameters(), None)

    @property
    def device(self) -> torch.device:
        """The device the transformer runs on: its first parameter's, or the execution device of diffusers' model
        offload hook (``enable_model_cpu_offload``: the weights wait on the CPU between calls)."""
        tr = self.pipe.transformer
        if tr is not None and "_hf_hook" in vars(tr):
            dev = execution_device(tr)
            if dev is not None:
                return dev
        p = self._first_parameter()
        return p.device if p is not None else tr.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the transformer computes in: its first parameter's, or, where diffusers' layerwise casting
        stores that parameter in another dtype (``enable_layerwise_casting``), the casting's compute dtype."""
        tr = self.pipe.transformer
        dtype = compute_dtype(tr) if getattr(tr, "_diffusers_hook", None) is None else None
        return dtype if dtype is not None and dtype.is_floating_point else tr.dtype

    def default_hw(self) -> tuple[int, int]:
        """``(height, width)`` in pixels when generate gets neither (default: :attr:`default_size` square; video
        pipelines have their own, e.g. 480 x 832)."""
        return self.default_size, self.default_size

    def max_size(self) -> int | None:
        """Largest height / width in pixels this model can take: :attr:`max_side_px` unless an adapter derives it
        from the model (a position table's size); None: no limit known."""
        return self.max_side_px

    def embed_dims(self) -> tuple[int, int | None] | None:
        """``(prompt embedding dim, pooled embedding dim)`` the model expects (None: not checked). A pooled dim of
        None means the model takes no pooled embedding (``pooled_prompt_embeds`` must then not be given)."""
        return None

    def dummy_embeds(self, batch: int, text_len: int | None = None, *, device=None, dtype=None,
                     negative: bool | None = None) -> dict:
        """Zero prompt embeddings (``generate`` keyword arguments) of ``text_len`` tokens (default
        :attr:`default_text_len`) for ``batch`` prompts: the pooled ones where the model takes them, the negative ones
        where it does classifier-free guidance (``negative``: give them or not; None: where the family takes
        them). For warm-ups and benchmarks, where the values do not matter."""
        dims = self.embed_dims()
        if dims is None:
            raise NotImplementedError(f"{type(self).__name__} does not state its embedding sizes (embed_dims)")
        joint, pooled = dims
        z = dict(device=self.device if device is None else device, dtype=self.dtype if dtype is None else dtype)
        n = self.default_text_len if text_len is None else text_len
        out = {"prompt_embeds": torch.zeros(batch, n, joint, **z)}
        if pooled is not None:
            out["pooled_prompt_embeds"] = torch.zeros(batch, pooled, **z)
        if self.supports_negative_prompt if negative is None else negative:
            out["negative_prompt_embeds"] = torch.zeros(batch, n, joint, **z)
            if pooled is not None:
                out["negative_pooled_prompt_embeds"] = torch.zeros(batch, pooled, **z)
        return out

    def preset_base_shift(self, height: int, width: int) -> float | None:
        """The model's own timestep shift h_ori for RALU presets at this image size (pixels), from the pipeline's
        scheduler and default step count (see :func:`scheduler_base_shift`); None: the preset's typed shift (FLUX.1
        and SD3 keep the reference implementation's fixed h_ori = 3)."""
        return None

    def check_size(self, height: int, width: int) -> None:
        """Raise ValueError unless height and width are positive multiples of :attr:`coarse_block_px` within
        :meth:`max_size` (TypeError for non-integers)."""
        blk = self.coarse_block_px
        cap = self.max_size()
        for name, val in (("height", height), ("width", width)):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)):
                raise TypeError(f"{name}={val!r} is not allowed: need an integer number of pixels")
            if val <= 0 or val % blk:
                raise ValueError(
                    f"{name}={val} is not allowed: RALU needs a positive multiple of {blk} pixels for this model "
                    f"(VAE factor {self.vae_scale_factor} x patch {self.patch_size} x 2 for the coarse stage)"
                )
            if cap is not None and val > cap:
                raise ValueError(f"{name}={val} is not allowed: this model takes at most {cap} pixels per side")

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def fine_tokens(self, height: int, width: int, latent_frames: int = 1) -> int:
        """Tokens at full resolution of a ``height x width`` (pixels) image, or of a video of ``latent_frames``
        latent frames: the sequence length the pipelines' timestep shift is computed from."""
        h, w = self.latent_hw(height, width)
        return latent_frames * (h // self.patch_size) * (w // self.patch_size)

    # ---- tokens --------------------------------------------------------------------------------------
    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> ``(B, (h/p)(w/p), C p p)`` tokens in raster order."""
        b, c, h, w = latents.shape
        p = self.patch_size
        x = latents.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Inverse of :meth:`pack`: raster tokens -> ``(B, C, h, w)`` latents."""
        b, _, ct = tokens.shape
        p = self.patch_size
        c = ct // (p * p)
        x = tokens.view(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, h, w)

    # ---- model ---------------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompt(self, prompt, negative_prompt, *, prompt_embeds=None, pooled_prompt_embeds=None,
                      negative_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                      num_images_per_prompt: int = 1, guidance_scale: float, max_sequence_length: int | None = None,
                      prompt_embeds_mask=None, negative_prompt_embeds_mask=None) -> Conditioning:
        """Encode prompts (or take embeddings) for ``batch = len(prompts) * num_images_per_prompt`` images.

        ``prompt_embeds_mask`` / ``negative_prompt_embeds_mask``: ``(B, T)`` 0/1 masks of the given embeddings'
        valid text tokens (only for adapters with ``takes_prompt_mask``; None = all valid)."""

    def prepare_noise(self, batch: int, height: int, width: int, generators, dtype) -> torch.Tensor:
        """Full-resolution latent noise ``(B, C, h, w)``, drawn exactly like the diffusers pipeline does."""
        from diffusers.utils.torch_utils import randn_tensor

        h, w = self.latent_hw(height, width)
        return randn_tensor((batch, self.latent_channels, h, w), generator=generators, device=self.device, dtype=dtype)

    def prepare_edit_noise(self, batch: int, height: int, width: int, generators, dtype) -> torch.Tensor:
        """The full-resolution noise of an edit (img2img, inpainting), drawn like the family's editing pipelines:
        :meth:`prepare_noise` unless they draw differently from the text-to-image pipeline."""
        return self.prepare_noise(batch, height, width, generators, dtype)

    @abstractmethod
    def velocity(self, tokens: torch.Tensor, grid: TokenGrid, timestep: torch.Tensor, cond: Conditioning,
                 impl: ModelImpl | None = None) -> torch.Tensor:
        """Flow velocity ``(B, L, C_tok)`` for tokens at ``timestep = 1000 * sigma`` (0-dim float32 tensor).

        ``impl``: how to execute the model (compiled block callables, fused weights); None = plain eager."""

    packs: bool = False   # True when the family implements a real packed call
    # The work limits of ralu_runtime.limits apply (False for analytic stand-ins whose model call is closed-form math
    # on a few tensors, e.g. the Gaussian oracles, which draw hundreds of samples per call)
    bounded_work: bool = True

    def packed_velocity(self, calls: Sequence[VelocityCall], impl: ModelImpl | None = None, *,
                        execution=None) -> list[torch.Tensor]:
        """Velocities, one (B_i, L_i, C_tok) per call, in order. Default: one self.velocity per call (no packing).

        ``execution``: how a compile runner executes packed calls (padding to a token bucket, CUDA graphs;
        :class:`ralu_runtime.compile.packed.RunnerExecution`); families that pack take it, the default ignores it.

        Each result equals ``self.velocity(call.tokens, call.grid, call.timestep, call.cond, impl)``. Families with
        ``packs = True`` run all calls as one transformer call over a packed token sequence (every image one
        attention segment, its own timestep, guidance, text and positions) where they can, and fall back to this
        per-call loop where they cannot (see the family's docstring). The calls are checked first
        (:func:`check_velocity_calls`: ValueError for an empty list, mismatched shapes, devices or dtypes)."""
        calls = check_velocity_calls(calls)
        return [self.velocity(c.tokens, c.grid, c.timestep, c.cond, impl) for c in calls]

    @abstractmethod
    def baseline_schedule(self, num_steps: int, image_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The diffusers pipeline's own ``(timesteps (N,), sigmas (N+1,))`` float32 for a full-resolution run,
        configured on a copy from :meth:`scheduler_copy` (never on the pipeline's own scheduler)."""

    def check_baseline_steps(self, num_steps: int) -> None:
        """ValueError, before any work, for a step count the pipeline's scheduler cannot make a schedule of: one
        step with ``shift_terminal`` set (Qwen-Image's 0.02) divides by ``1 - sigma_last = 0`` in diffusers'
        stretch to the terminal value."""
        config = getattr(getattr(self.pipe, "scheduler", None), "config", None) or {}  # (oracles: no pipeline)
        terminal = config.get("shift_terminal")
        if terminal and num_steps < 2:
            raise ValueError(f"num_inference_steps={num_steps} is not allowed for {type(self.pipe).__name__}: its "
                             f"scheduler stretches the schedule to shift_terminal={terminal}, which needs at least "
                             "2 steps")

    def scheduler_copy(self):
        """A deep copy of the pipeline's scheduler, for :meth:`baseline_schedule` to configure (the pipeline's own is
        never changed); recorded for :func:`scheduler_copies`, so a baseline can follow that copy's ``step``."""
        sched = copy.deepcopy(self.pipe.scheduler)
        got = _SCHEDULER_COPIES.get()
        if got is not None:
            got.append(sched)
        return sched

    def decode(self, latents: torch.Tensor, impl: ModelImpl | None = None) -> torch.Tensor:
        """Latents ``(B, C, h, w)`` -> images ``(B, 3, 8h, 8w)`` float in about [-1, 1]."""
        vae = self.pipe.vae
        latents = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        latents = latents.to(compute_dtype(vae))
        fn = (impl or EAGER).vae_decode(vae)
        return fn(latents) if fn is not None else vae.decode(latents, return_dict=False)[0]

    def edge_images(self, latents: torch.Tensor, decode: Callable) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in about [-1, 1] whose edges choose the regions upsampled first, from the
        half-resolution Tweedie latents of stage 1 (``decode``: the call's VAE decode). Images: the decode itself.
        Video adapters return one decoded frame per latent frame, stacked vertically (the tall-image layout of
        :class:`TokenGrid`)."""
        return decode(latents)

    def postprocess(self, images: torch.Tensor, output_type: str):
        """Images in [-1, 1] -> the requested ``output_type`` ("pil", "np", "pt")."""
        return self.pipe.image_processor.postprocess(images, output_type=output_type)
