"""Every model family ralu runs, as data: one record per family, per published model, per built-in random model.

Importable without torch (plain dataclasses; builders and adapters are named as ``"module:name"`` strings and
imported only when used), so the CLI's ``--help`` and argument checks read it too.

* :class:`Family` (:data:`FAMILIES`, keyed by ``adapter.family``): the diffusers pipeline classes one adapter runs,
  the adapter class, the defaults ``generate`` uses when an argument is not given (steps, guidance, preset, the
  fallback timestep shift h_ori, size, frames, text length) and the family's RALU presets (:class:`PresetSpec`).
  The defaults are the pipeline's own ``__call__`` defaults (diffusers 0.42.1), so ``speedup=None`` with no
  arguments runs what ``pipe(prompt)`` runs; where a pipeline identifies a release whose published setting differs
  (FLUX.1-schnell, FLUX.2-klein distilled, Wan 2.2 T2V A14B) the adapter uses that release's setting.
* :class:`Model` (:data:`MODELS`, keyed by the benchmarks' names): a published release with its published
  settings (the sampler its model card or released configs use) and the builders of its random-weight stand-ins at
  benchmark ("small") and published ("full") size. The benchmarks' baselines are these.
* :class:`TinyModel` (:data:`TINY_MODELS`, keyed by ``ralu generate --model`` names): the built-in tiny random
  pipelines of :mod:`ralu_runtime.tiny`.

Sources: every default names where it comes from; "RALU_DESIGN 7" is the project's check of the released configs
and the models' own repositories (2026-12-04), "pipeline default" a diffusers 0.42.1 ``__call__`` default.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple

__all__ = ["CPU_FRAMES", "EDIT_PIPELINES", "TINY_SIZE", "TINY_TEXT_LEN", "FAMILIES", "Family", "MODELS", "Model", "PresetSpec", "TINY_MODELS", "TinyModel",
           "family_for_pipeline", "load_object"]

CPU_FRAMES = 9  # frames of the CPU runs of video models (the tiny models' default clip, the small benchmarks): 3 latent
TINY_SIZE = 256  # pixels per side of the tiny models' default image (ralu generate --model tiny-...)
TINY_TEXT_LEN = 77  # the tiny models' default max_sequence_length (their CLIP's position table)


def load_object(target: str) -> Any:
    """Import ``"package.module:name"`` and return ``name`` (a builder function or an adapter class)."""
    module, sep, name = target.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"{target!r} is not a 'module:name' reference")
    return getattr(importlib.import_module(module), name)


def _frozen(mapping) -> Mapping:
    return MappingProxyType(dict(mapping or {}))


# ----------------------------------------------------------------------------------------------- presets
class PresetSpec(NamedTuple):
    """A RALU preset before NT-Matching: steps N_k per stage, stage ends e_k (e_3 = 1), the ratio r of coarse tokens
    upsampled at the end of stage 1, and the model shift h_ori it is solved for (None: the model's own, from its
    pipeline's scheduler at the requested size; ``DiTAdapter.preset_base_shift``). Shifts and Z are always solved
    (:func:`ralu_runtime.schedule.get_preset`), never typed."""

    steps: tuple[int, int, int]
    ends: tuple[float, float, float]
    ratio: float
    base_shift: float | None


FLUX1_4X = ((5, 6, 7), (0.3, 0.45, 1.0), 0.3)   # the reference implementation's FLUX.1 presets (h_ori = 3), reused
FLUX1_7X = ((2, 3, 5), (0.2, 0.3, 1.0), 0.1)    # with the model's own h_ori by the other 50-step families
FEW_STEP = ((1, 1, 2), (0.35, 0.55, 1.0), 0.1)  # 4 model calls; interior NT-Matching optimum for h_ori = 1
THREE_STEP = ((1, 1, 1), (0.35, 0.55, 1.0), 0.1)  # 3 model calls (one at full resolution); interior for h_ori >= 3


def _presets(**specs) -> Mapping[str, PresetSpec]:
    return MappingProxyType({name.replace("_", ""): PresetSpec(*spec) for name, spec in specs.items()})


def _own(spec) -> tuple:
    return (*spec, None)  # solved for the model's own h_ori


# ----------------------------------------------------------------------------------------------- families
@dataclass(frozen=True)
class Family:
    """One adapter family (``adapter.family``; its presets are keyed by it).

    ``pipelines``: diffusers pipeline class names that select this family's adapter (subclasses too; empty for a
    variant the adapter picks from the pipeline's config, e.g. FLUX.1-schnell). ``adapter``: ``"module:Class"``.
    ``default_steps`` / ``default_guidance`` / ``default_preset``: what ``generate`` uses when not given.
    ``base_shift``: h_ori where the adapter has no per-pipeline value (None: always from the pipeline's scheduler).
    ``default_hw``: (height, width) pixels when not given (None: computed from the pipeline). ``default_text_len``:
    text tokens of an encoded prompt (warm-up's dummy embeddings). ``max_side_px``: largest side in pixels (None:
    read from the model's position tables). Video: ``default_frames``, ``temporal_factor`` (``num_frames = 1 + k *
    factor``)."""

    name: str
    label: str
    pipelines: tuple[str, ...]
    adapter: str
    default_steps: int
    default_guidance: float
    default_preset: str
    base_shift: float | None
    default_hw: tuple[int, int] | None
    default_text_len: int
    presets: Mapping[str, PresetSpec]
    max_side_px: int | None = None
    default_frames: int | None = None
    temporal_factor: int = 1
    variant_of: str | None = None  # the family whose pipeline class this variant shares
    negative_prompt: bool = False  # classifier-free guidance with negative prompts (FLUX.2: klein base only, by class)

    def __post_init__(self):
        if self.default_preset not in self.presets:
            raise ValueError(f"family {self.name!r}: default_preset {self.default_preset!r} is not one of its presets "
                             f"{tuple(self.presets)}")

    @property
    def is_video(self) -> bool:
        return self.default_frames is not None

    @property
    def default_size(self) -> int | None:
        """Square default side in pixels (the adapters' ``default_size``), None where it comes from the pipeline."""
        return None if self.default_hw is None else self.default_hw[0]

    def adapter_class(self):
        return load_object(self.adapter)


_FAMILY_LIST = (
    Family(
        "flux", "FLUX.1-dev", ("FluxPipeline",), "ralu_runtime.adapters.flux:FluxAdapter",
        default_steps=28,        # pipeline default (FluxPipeline)
        default_guidance=3.5,    # pipeline default; also FLUX.1-dev's model card
        default_preset="7x",     # the paper's headline preset
        base_shift=3.0,          # scheduler_config.json shift 3.0 (dynamic 0.5/1.15 over 256/4096: RALU_DESIGN 7);
                                 # the reference implementation's typed h_ori
        default_hw=(1024, 1024),  # FluxPipeline: default_sample_size 128 x VAE factor 8
        default_text_len=512,    # pipeline default max_sequence_length
        max_side_px=4096,        # ralu's limit: 65536 fine tokens (FLUX.1 is trained up to about 2 MP)
        presets=_presets(
            _4x=(*FLUX1_4X, 3.0),
            # "5x": the paper reports 540.5 vs 2991.0 TFLOPs (5.53x). With the measured 21.5 / 74.4 TFLOPs per step
            # at 1024 / 4096 tokens (linear in between; stage 2 has 1024 + 3072 r tokens -> 32.1 at r = 0.2):
            # 3*21.5 + 5*32.1 + 6*74.4 = 671 TFLOPs vs 50*74.4 = 3720, i.e. 5.54x, the paper's ratio. e and r lie
            # between the 4x and 7x presets'.
            _5x=((3, 5, 6), (0.25, 0.4, 1.0), 0.2, 3.0),
            _7x=(*FLUX1_7X, 3.0))),
    Family(
        "flux-schnell", "FLUX.1-schnell", (), "ralu_runtime.adapters.flux:FluxAdapter", variant_of="flux",
        default_steps=4,         # FLUX.1-schnell's model card (a 4-step distilled model)
        default_guidance=3.5,    # pipeline default; unused (no guidance embedding: the card passes 0.0)
        default_preset="4step",
        base_shift=1.0,          # scheduler_config.json: shift 1.0, no dynamic shifting (RALU_DESIGN 7)
        default_hw=(1024, 1024), default_text_len=512, max_side_px=4096,  # as FLUX.1-dev (same pipeline)
        # h_ori = 1 (uniform target); e = (0.35, 0.55) gives an interior optimum (JSD ~0.006), (0.3, 0.45) drives Z
        # to its bound 2
        presets=_presets(_4step=(*FEW_STEP, 1.0))),
    Family(
        "sd3", "SD3/SD3.5", ("StableDiffusion3Pipeline",), "ralu_runtime.adapters.sd3:SD3Adapter",
        negative_prompt=True,
        default_steps=28,        # pipeline default (StableDiffusion3Pipeline); SD3 Medium's model card
        default_guidance=7.0,    # pipeline default; SD3 Medium's model card
        default_preset="3x",
        base_shift=3.0,          # scheduler_config.json shift 3.0 for SD3 and SD3.5 (RALU_DESIGN 7)
        default_hw=(1024, 1024),  # default_sample_size 128 x VAE factor 8
        default_text_len=77 + 256,  # CLIP tokens then T5 tokens (pipeline default max_sequence_length 256)
        # baseline 28 steps; estimate_cost_ratio(..., 28, 4096, text_tokens=333) at 1024^2: 2x -> 2.06, 3x -> 3.11
        presets=_presets(_2x=((5, 6, 9), (0.3, 0.45, 1.0), 0.3, 3.0), _3x=((4, 4, 6), (0.3, 0.45, 1.0), 0.2, 3.0))),
    Family(
        "flux2", "FLUX.2", ("Flux2Pipeline", "Flux2KleinPipeline"), "ralu_runtime.adapters.flux2:Flux2Adapter",
        default_steps=50,        # pipeline default (Flux2Pipeline, Flux2KleinPipeline)
        default_guidance=4.0,    # pipeline default (dev: embedded guidance; klein base: true CFG)
        default_preset="7x",
        base_shift=None,         # exp(compute_empirical_mu(tokens, steps)): 7.56 at 1024^2, 50 steps
        default_hw=(1024, 1024), default_text_len=512,  # default_sample_size 128 x 8; max_sequence_length 512
        max_side_px=4096,        # ralu's limit: 65536 fine tokens (FLUX.2 is trained up to about 4 MP)
        presets=_presets(_4x=_own(FLUX1_4X), _7x=_own(FLUX1_7X))),
    Family(
        "flux2-klein", "FLUX.2-klein (distilled)", (), "ralu_runtime.adapters.flux2:Flux2Adapter", variant_of="flux2",
        default_steps=4,         # FLUX.2-klein's step-distilled release: 4 steps (Flux2KleinPipeline, is_distilled)
        default_guidance=4.0,    # pipeline default; unused (a distilled model runs no guidance)
        default_preset="4step",
        base_shift=None,         # exp(mu) at 4 steps: 9.89 at 1024^2
        default_hw=(1024, 1024), default_text_len=512, max_side_px=4096,
        presets=_presets(_4step=_own(FEW_STEP), _3step=_own(THREE_STEP))),
    Family(
        "qwen-image", "Qwen-Image", ("QwenImagePipeline",), "ralu_runtime.adapters.qwen_image:QwenImageAdapter",
        negative_prompt=True,
        default_steps=50,        # pipeline default
        default_guidance=4.0,    # pipeline default true_cfg_scale (generate's guidance_scale is it)
        default_preset="7x",
        base_shift=2.0,          # exp(mu) of the published scheduler (0.5/0.9 over 256/8192) at 1024^2
        default_hw=(1024, 1024),  # the pipeline's default (the card's native 1328 is no multiple of 32)
        default_text_len=512,    # pipeline default max_sequence_length
        max_side_px=4096,        # ralu's limit: 65536 fine tokens (trained up to about 1.8 MP)
        presets=_presets(_4x=_own(FLUX1_4X), _7x=_own(FLUX1_7X))),
    Family(
        "z-image", "Z-Image / Z-Image-Turbo", ("ZImagePipeline",), "ralu_runtime.adapters.z_image:ZImageAdapter",
        negative_prompt=True,
        default_steps=50,        # pipeline default (Z-Image; Z-Image-Turbo: MODELS["z-image-turbo"])
        default_guidance=5.0,    # pipeline default
        default_preset="7x",
        base_shift=3.0,          # Z-Image-Turbo's scheduler_config.json: shift 3.0, static (RALU_DESIGN 7; the base
                                 # model's scheduler file was not found published)
        default_hw=(1024, 1024), default_text_len=512,  # model cards: 1024^2; pipeline default max_sequence_length
        presets=_presets(_4x=_own(FLUX1_4X), _7x=_own(FLUX1_7X), _4step=_own(FEW_STEP),
                         _3step=_own(THREE_STEP))),
    Family(
        "chroma", "Chroma", ("ChromaPipeline",), "ralu_runtime.adapters.chroma:ChromaAdapter",
        negative_prompt=True,
        default_steps=35,        # pipeline default
        default_guidance=5.0,    # pipeline default (true CFG)
        default_preset="5x",
        base_shift=3.0,          # fallback; presets use the pipeline scheduler's mu (no published file found)
        default_hw=(1024, 1024), default_text_len=512,  # default_sample_size 128 x 8; max_sequence_length 512
        max_side_px=4096,        # ralu's limit: 65536 fine tokens, as FLUX
        # estimate_cost_ratio(..., 35, 4096, text_tokens=300): 3.25 and 5.21
        presets=_presets(_3x=((4, 5, 7), (0.3, 0.45, 1.0), 0.3, None), _5x=((2, 3, 5), (0.2, 0.3, 1.0), 0.1, None))),
    Family(
        "wan", "Wan", ("WanPipeline",), "ralu_runtime.adapters.wan:WanAdapter",
        negative_prompt=True,
        default_steps=50,        # pipeline default (Wan 2.2 T2V A14B: MODELS["wan22-a14b"], applied by the adapter)
        default_guidance=5.0,    # pipeline default; Wan 2.1's model card
        default_preset="7x",
        base_shift=3.0,          # Wan 2.1's scheduler_config.json flow_shift 3.0 (the 480p setting; 5.0 at 720p);
                                 # presets use the pipeline scheduler's own flow shift
        default_hw=(480, 832),   # pipeline default height, width
        default_text_len=512,    # pipeline default max_sequence_length (UMT5 states padded to it)
        default_frames=81,       # pipeline default num_frames
        temporal_factor=4,       # AutoencoderKLWan: scale_factor_temporal 4
        # video: 50 steps, CFG; time kept at full resolution, 2x spatial per latent frame
        presets=_presets(_4x=_own(FLUX1_4X), _7x=_own(FLUX1_7X))),
    Family(
        "hunyuan-video-1.5", "HunyuanVideo 1.5", ("HunyuanVideo15Pipeline",),
        "ralu_runtime.adapters.hunyuan_video15:HunyuanVideo15Adapter",
        negative_prompt=True,
        default_steps=50,        # pipeline default; the release's 50 steps (RALU_DESIGN 7)
        default_guidance=6.0,    # the published guider config (ClassifierFreeGuidance 6.0); the adapter reads the
                                 # pipeline's guider
        default_preset="7x",
        base_shift=None,         # the scheduler's shift: 9.0 at 720p, 5.0 at 480p (RALU_DESIGN 7)
        default_hw=(480, 832),   # the 480p pipeline's 16:9 bucket 480 x 848, rounded down to the 32-px block (the
                                 # adapter computes it from the pipeline's target_size: 704 x 1280 at 720p)
        default_text_len=1000,   # the pipeline pads Qwen embeddings to tokenizer_max_length 1000
        max_side_px=2048,
        default_frames=121,      # pipeline default num_frames; the release's 121 (RALU_DESIGN 7)
        temporal_factor=4,       # the VAE's temporal compression
        presets=_presets(_4x=_own(FLUX1_4X), _7x=_own(FLUX1_7X))),
)
FAMILIES: Mapping[str, Family] = MappingProxyType({f.name: f for f in _FAMILY_LIST})


def family_for_pipeline(class_name: str) -> Family | None:
    """The family whose adapter runs pipelines of class ``class_name`` (the base family of a variant; for an editing
    pipeline of :data:`EDIT_PIPELINES`, its text-to-image pipeline's family), or None."""
    class_name = EDIT_PIPELINES.get(class_name, (class_name,))[0]
    for fam in _FAMILY_LIST:
        if class_name in fam.pipelines:
            return fam
    return None


# editing pipelines (img2img / inpaint) -> (the text-to-image pipeline class whose adapter runs them, edit kind);
# what ralu does with each is in ralu_runtime.editing (docs/editing.md)
EDIT_PIPELINES: Mapping[str, tuple[str, str]] = MappingProxyType({
    "FluxImg2ImgPipeline": ("FluxPipeline", "img2img"),
    "StableDiffusion3Img2ImgPipeline": ("StableDiffusion3Pipeline", "img2img"),
    "FluxInpaintPipeline": ("FluxPipeline", "inpaint"),
    "StableDiffusion3InpaintPipeline": ("StableDiffusion3Pipeline", "inpaint"),
    "FluxFillPipeline": ("FluxPipeline", "fill"),  # conditioning channels: ralu_runtime.channel_cond
    "FluxControlPipeline": ("FluxPipeline", "control"),
    "FluxKontextPipeline": ("FluxPipeline", "kontext"),  # reference tokens, no noising: ralu_runtime.kontext
    "ChromaImg2ImgPipeline": ("ChromaPipeline", "img2img"),
    "ChromaInpaintPipeline": ("ChromaPipeline", "inpaint"),
    "ZImageImg2ImgPipeline": ("ZImagePipeline", "img2img"),
    "ZImageInpaintPipeline": ("ZImagePipeline", "inpaint"),
    "QwenImageImg2ImgPipeline": ("QwenImagePipeline", "img2img"),
    "QwenImageInpaintPipeline": ("QwenImagePipeline", "inpaint"),
})


# ----------------------------------------------------------------------------------------------- published models
@dataclass(frozen=True)
class Model:
    """A published release with its published sampler settings, and its random-weight stand-ins.

    ``family``: the ``adapter.family`` its pipeline gets. ``builder``: ``"module:function"`` called as
    ``function(size, device=, dtype=, seed=, **build_kwargs, **(full_kwargs if size == "full"))`` with size
    "small" (a CPU benchmark shape) or "full" (the published transformer config; build it on ``device="meta"`` to
    count FLOPs); ``flow_shift`` (where not None) is passed too: the release's scheduler shift where it differs from
    the builder's published scheduler config. ``embeds``: ``"module:function"`` called as ``function(pipe, batch,
    text_len, seed=, device=, dtype=, cfg=)`` -> ``generate`` prompt-embedding arguments. ``steps`` / ``guidance``
    (``guidance_2``: Wan 2.2's low-noise expert; None: the family's default): the release's sampler. ``native``:
    (height, width) pixels it is benchmarked at; ``frames``: video frames; ``text_len``: prompt tokens at full size.
    ``presets``: the presets benchmarked (None: all of the family's). ``cpu_size`` / ``cpu_text_len``: the CPU
    benchmark runs of the "small" model (video: :data:`CPU_FRAMES` frames)."""

    key: str
    label: str
    family: str
    builder: str
    embeds: str
    steps: int
    guidance: float | None
    native: tuple[int, int]
    text_len: int
    cfg: bool = False
    guidance_2: float | None = None
    flow_shift: float | None = None
    frames: int | None = None
    presets: tuple[str, ...] | None = None
    build_kwargs: Mapping[str, Any] = field(default_factory=dict)
    full_kwargs: Mapping[str, Any] = field(default_factory=dict)
    cpu_size: tuple[int, int] = (256, 256)
    cpu_text_len: int = 32
    notes: str = ""

    def __post_init__(self):
        object.__setattr__(self, "build_kwargs", _frozen(self.build_kwargs))
        object.__setattr__(self, "full_kwargs", _frozen(self.full_kwargs))
        if self.family not in FAMILIES:
            raise ValueError(f"model {self.key!r}: unknown family {self.family!r}")
        unknown = set(self.presets or ()) - set(FAMILIES[self.family].presets)
        if unknown:
            raise ValueError(f"model {self.key!r}: presets {sorted(unknown)} are not presets of {self.family}")

    @property
    def preset_names(self) -> tuple[str, ...]:
        """The presets benchmarked: its own list, or all of its family's."""
        return self.presets or tuple(FAMILIES[self.family].presets)

    def build(self, size: str, device="cpu", dtype=None, seed: int = 0):
        """The random-weight pipeline of this release at ``size`` ("small" or "full"); ``dtype`` a torch dtype
        (None: float32)."""
        if size not in ("small", "full"):
            raise ValueError(f"size={size!r} is not allowed; choose 'small' or 'full'")
        kwargs = dict(self.build_kwargs)
        if size == "full":
            kwargs.update(self.full_kwargs)
        if self.flow_shift is not None:
            kwargs["flow_shift"] = self.flow_shift
        size = kwargs.pop("size", size)
        if dtype is not None:
            kwargs["dtype"] = dtype
        return load_object(self.builder)(size, device=device, seed=seed, **kwargs)

    def random_embeds(self, pipe, batch: int, text_len: int, device="cpu", dtype=None, seed: int = 0) -> dict:
        """Random prompt embeddings for ``pipe`` (negative ones too where the release runs CFG)."""
        kwargs = {} if dtype is None else {"dtype": dtype}
        emb = load_object(self.embeds)(pipe, batch, text_len, seed=seed, device=device, cfg=self.cfg, **kwargs)
        emb.pop("guidance_scale", None)  # the release's guidance is given separately
        return emb


def _tiny(module: str) -> tuple[str, str]:
    return f"ralu_runtime.tiny.{module}:build_{module}_pipeline", f"ralu_runtime.tiny.{module}:random_embeds"


_MODEL_LIST = (
    Model("flux", "FLUX.1-dev", "flux", *_tiny("flux"),
          steps=50,              # FLUX.1-dev's model card (50 steps, guidance 3.5) and the paper's 2991-TFLOP baseline
          guidance=3.5,          # the model card (embedded guidance)
          native=(1024, 1024), text_len=512, cpu_size=(512, 512), cpu_text_len=64),
    Model("sd3", "SD3-medium", "sd3", *_tiny("sd3"), cfg=True,
          steps=28, guidance=7.0,  # SD3 Medium's model card (= the pipeline's defaults)
          native=(1024, 1024), text_len=77 + 256, cpu_size=(512, 512), cpu_text_len=77),
    Model("sd35-large", "SD3.5 Large", "sd3", *_tiny("sd35"), cfg=True, build_kwargs={"variant": "large"},
          steps=28, guidance=3.5,  # stable-diffusion-3.5-large's model card
          native=(1024, 1024), text_len=77 + 256),
    Model("sd35-medium", "SD3.5 Medium", "sd3", *_tiny("sd35"), cfg=True, build_kwargs={"variant": "medium"},
          steps=40, guidance=4.5,  # stable-diffusion-3.5-medium's recommended setting (RALU_DESIGN 7); the
                                   # pipeline's defaults are 28 / 7.0
          native=(1024, 1024), text_len=77 + 256),
    Model("flux2", "FLUX.2-dev", "flux2", *_tiny("flux2"),
          steps=50, guidance=4.0,  # the pipeline's defaults (Flux2Pipeline); embedded guidance
          native=(1024, 1024), text_len=512),
    Model("flux2-klein", "FLUX.2-klein 4B (distilled)", "flux2-klein", *_tiny("flux2"),
          build_kwargs={"distilled": True}, full_kwargs={"size": "full-klein"},
          steps=4, guidance=None,  # the step-distilled release: 4 steps, no guidance
          native=(1024, 1024), text_len=512),
    Model("qwen-image", "Qwen-Image", "qwen-image", *_tiny("qwen_image"), cfg=True,
          steps=50, guidance=4.0,  # the pipeline's defaults (50 steps, true_cfg_scale 4.0)
          native=(1344, 1344),
          text_len=128,          # a typical detailed prompt after the template's 34 system tokens are dropped
          notes="1344^2: the native 1328 is not a multiple of RALU's 32-px block"),
    Model("z-image", "Z-Image", "z-image", *_tiny("z_image"), cfg=True, presets=("4x", "7x"),
          steps=50, guidance=5.0,  # the pipeline's defaults
          native=(1024, 1024),   # the model cards: 1024 x 1024
          text_len=128),         # typical caption tokens after the chat template (no padding to 512)
    Model("z-image-turbo", "Z-Image-Turbo", "z-image", *_tiny("z_image"), presets=("4step", "3step"),
          steps=8,               # the release is 8 model calls (its card's "9 steps" are 8 DiT forwards with its
                                 # scheduler); diffusers 0.42.1 makes N steps N calls (RALU_DESIGN 7)
          guidance=0.0,          # model card: no CFG
          native=(1024, 1024), text_len=128, notes="model card: 8 model calls, no CFG"),
    Model("chroma", "Chroma1-HD", "chroma", *_tiny("chroma"), cfg=True,
          steps=35, guidance=5.0,  # the pipeline's defaults (no published scheduler file found: RALU_DESIGN 7)
          native=(1024, 1024), text_len=512),
    Model("wan-480p", "Wan 2.1 T2V 14B 480p, 81 frames", "wan", *_tiny("wan"), cfg=True,
          steps=50, guidance=5.0,  # Wan 2.1's model card / the pipeline's defaults
          flow_shift=3.0,        # the model card: 3.0 for 480p (= scheduler_config.json)
          native=(480, 832), frames=81, text_len=512, cpu_size=(64, 96)),
    Model("wan-720p", "Wan 2.1 T2V 14B 720p, 81 frames", "wan", *_tiny("wan"), cfg=True,
          steps=50, guidance=5.0,  # as 480p
          flow_shift=5.0,        # the model card: 5.0 for 720p (RALU_DESIGN 7)
          native=(704, 1280), frames=81, text_len=512, cpu_size=(64, 96),
          notes="704 x 1280: 720 is not a multiple of 32"),
    Model("wan22-a14b", "Wan 2.2 T2V A14B 720p, 81 frames", "wan", *_tiny("wan"), cfg=True,
          build_kwargs={"two_experts": True},
          steps=40,              # the release: 40 steps (RALU_DESIGN 7)
          guidance=4.0,          # high-noise expert (RALU_DESIGN 7)
          guidance_2=3.0,        # low-noise expert (RALU_DESIGN 7)
          flow_shift=3.0,        # diffusers' converted scheduler keeps 3.0 (the original release samples at 12.0)
          native=(704, 1280), frames=81, text_len=512, cpu_size=(64, 96),
          notes="704 x 1280: 720 is not a multiple of 32; two experts, boundary 0.875"),
    Model("hunyuan-video15", "HunyuanVideo 1.5 720p, 121 frames", "hunyuan-video-1.5", *_tiny("hunyuan_video15"),
          cfg=True,
          steps=50, guidance=6.0,  # the release: 50 steps, guider CFG 6.0, scheduler shift 9.0 at 720p (RALU_DESIGN 7)
          native=(704, 1280), frames=121, cpu_size=(64, 96),
          text_len=128),         # valid Qwen tokens of a typical detailed prompt (padded to 1000, padding masked)
)
MODELS: Mapping[str, Model] = MappingProxyType({m.key: m for m in _MODEL_LIST})


# ----------------------------------------------------------------------------------------------- tiny models
@dataclass(frozen=True)
class TinyModel:
    """A built-in random pipeline (``ralu generate --model NAME``): its family, its builder ``"module:function"``
    with fixed keyword arguments, the largest side its position tables allow (``max_side_px``), and the CLI's
    defaults for it (``default_size`` pixels per side, ``default_frames`` for video, ``max_sequence_length``: the tiny
    CLIP's position table)."""

    name: str
    family: str
    builder: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    max_side_px: int = 4096
    default_size: int = TINY_SIZE
    max_sequence_length: int = TINY_TEXT_LEN

    def __post_init__(self):
        object.__setattr__(self, "kwargs", _frozen(self.kwargs))
        if self.family not in FAMILIES:
            raise ValueError(f"tiny model {self.name!r}: unknown family {self.family!r}")

    @property
    def default_frames(self) -> int | None:
        """The tiny video models' default clip (:data:`CPU_FRAMES`); None for images."""
        return CPU_FRAMES if FAMILIES[self.family].is_video else None

    def build(self, **kwargs):
        """Build it; ``kwargs``: device, dtype, seed."""
        return load_object(self.builder)(**self.kwargs, **kwargs)


_TINY_LIST = (
    TinyModel("tiny-flux", "flux", "ralu_runtime.tiny:build_tiny_flux_pipeline"),
    TinyModel("tiny-flux-fill", "flux", "ralu_runtime.tiny.flux_fill:build_tiny_flux_fill_pipeline"),
    TinyModel("tiny-flux-control", "flux", "ralu_runtime.tiny.flux_fill:build_tiny_flux_control_pipeline"),
    TinyModel("tiny-flux-kontext", "flux", "ralu_runtime.tiny:build_tiny_flux_pipeline", {"kontext": True}),
    TinyModel("tiny-sd3", "sd3", "ralu_runtime.tiny:build_tiny_sd3_pipeline", max_side_px=1536),  # 96-cell table
    TinyModel("tiny-sd35", "sd3", "ralu_runtime.tiny.sd35:build_tiny_sd35_pipeline", {"variant": "large"},
              max_side_px=1536),
    TinyModel("tiny-flux2", "flux2", "ralu_runtime.tiny.flux2:build_tiny_flux2_pipeline"),
    TinyModel("tiny-flux2-klein", "flux2-klein", "ralu_runtime.tiny.flux2:build_tiny_flux2_pipeline",
              {"klein": True, "distilled": True}),
    TinyModel("tiny-qwen-image", "qwen-image", "ralu_runtime.tiny.qwen_image:build_tiny_qwen_image_pipeline"),
    TinyModel("tiny-z-image", "z-image", "ralu_runtime.tiny.z_image:build_tiny_z_image_pipeline", max_side_px=8192),
    TinyModel("tiny-chroma", "chroma", "ralu_runtime.tiny.chroma:build_tiny_chroma_pipeline"),
    TinyModel("tiny-wan", "wan", "ralu_runtime.tiny.wan:build_tiny_wan_pipeline"),
    TinyModel("tiny-wan22", "wan", "ralu_runtime.tiny.wan:build_tiny_wan_pipeline", {"two_experts": True}),
    TinyModel("tiny-hunyuan-video15", "hunyuan-video-1.5",
              "ralu_runtime.tiny.hunyuan_video15:build_tiny_hunyuan_video15_pipeline", max_side_px=2048),
)
TINY_MODELS: Mapping[str, TinyModel] = MappingProxyType({t.name: t for t in _TINY_LIST})
