"""diffusers' model CPU offload (``pipe.enable_model_cpu_offload()``) under ralu's ``generate``.

diffusers' model offload puts an accelerate ``CpuOffload`` hook on each model of the pipeline (in the order of its
``model_cpu_offload_seq``, e.g. FLUX.1 ``text_encoder -> text_encoder_2 -> image_encoder -> transformer -> vae``): a
model's ``forward`` (a VAE's ``encode`` / ``decode``) moves it to the execution device and moves the model before it
in that order back to the CPU; the pipeline call ends with ``maybe_free_model_hooks()``, which offloads every model.
At most one large model is then on the accelerator at a time.

ralu never calls the transformer's ``forward`` (it runs its layers itself), so it does that hook's work itself:

* :func:`onload` before every model call (what the hook's ``forward`` would do: the model to its execution device,
  the one before it back to the CPU; nothing moves when nothing needs to);
* the region-choice preview decode inside a RALU run keeps the transformer where it is
  (:func:`keeping_models`: the VAE joins it, about 1 % of its size), since stages 2 and 3 need it again; the final
  decode offloads it as the pipeline's does;
* :func:`free_models` at the end of the call, as the pipeline's ``__call__`` does.

Eager execution only (:func:`check_offload`): a compiled, exported or CUDA-graph backend holds weights where the
model was when it was built, and ralu's weight copies (fused q/k/v, fp8) would stay on the accelerator for good;
context parallelism and the serving engine (which keeps its model resident and runs requests concurrently) refuse
it too. diffusers' sequential offload (``enable_sequential_cpu_offload``) and ``device_map`` placements are not
supported (refused by :meth:`~ralu_runtime.adapters.DiTAdapter.check_forwards`). Like the pipeline itself, an
offloaded pipeline runs one call at a time (ralu serializes its ``generate`` calls).
"""
from __future__ import annotations

import contextlib

import torch


def offload_hook(module) -> object | None:
    """The accelerate ``CpuOffload`` hook diffusers' ``enable_model_cpu_offload`` (or accelerate's
    ``cpu_offload_with_hook``) put on ``module``, or None (no hook, another kind of hook, accelerate not installed)."""
    hook = getattr(module, "_hf_hook", None) if isinstance(module, torch.nn.Module) else None
    if hook is None:
        return None
    try:
        from accelerate.hooks import CpuOffload
    except ImportError:
        return None
    return hook if type(hook) is CpuOffload else None


def execution_device(module) -> torch.device | None:
    """The device ``module``'s offload hook runs it on (None: no offload hook)."""
    hook = offload_hook(module)
    if hook is None:
        return None
    dev = hook.execution_device
    return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)


def module_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` runs: its offload hook's execution device, else its first parameter's (CPU without any)."""
    dev = execution_device(module)
    if dev is not None:
        return dev
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def onload(module) -> None:
    """Do what ``module``'s offload hook does before its ``forward``: move the model before it in the pipeline's
    offload order to the CPU (if it is not there) and ``module`` to its execution device (if it is not there).
    Nothing without an offload hook."""
    hook = offload_hook(module)
    if hook is not None:
        hook.pre_forward(module)


def onloading(adapter, velocity):
    """``velocity(tokens, grid, timestep, cond)`` that first onloads the model(s) the call runs
    (:meth:`~ralu_runtime.adapters.DiTAdapter.onload_models`)."""

    def call(tokens, grid, timestep, cond):
        adapter.onload_models(timestep, cond)
        return velocity(tokens, grid, timestep, cond)

    return call


def offloaded_components(pipe) -> list[str]:
    """Names of ``pipe``'s components that carry a model offload hook (empty: not offloaded)."""
    comps = getattr(pipe, "components", None)
    if not isinstance(comps, dict):
        return []
    return [name for name, mod in comps.items() if offload_hook(mod) is not None]


def offloaded_models(adapter) -> list[str]:
    """Pipeline names of the adapter's model modules (:meth:`~ralu_runtime.adapters.DiTAdapter.named_model_modules`)
    that carry a model offload hook (empty: the models it runs are not offloaded)."""
    return [name for name, mod in adapter.named_model_modules() if offload_hook(mod) is not None]


def check_offload(adapter, *, backend: str | None = None, cuda_graphs: bool = False, compile_vae: bool = False,
                  fused_qkv: bool = False, fp8: bool = False, parallel: bool = False, engine: bool = False) -> None:
    """ValueError, before any work, when the models the adapter runs are model-offloaded (:func:`offloaded_models`)
    and the call asks for what cannot run offloaded: ``backend`` other than "eager" (None: eager), CUDA graphs, a
    compiled VAE, fused q/k/v or fp8 weight copies, context parallelism, the serving engine."""
    names = offloaded_models(adapter)
    if not names:
        return
    why = None
    if engine:
        why = ("the serving engine keeps its model on the accelerator and runs requests concurrently (an offload "
               "hook would move models under a running call)")
    elif parallel:
        why = "context parallelism runs one model per rank on its own device"
    elif backend not in (None, "eager"):
        why = f"backend={backend!r} holds the weights where they were when it was built"
    elif cuda_graphs:
        why = "cuda_graphs=True replays the weights' addresses of the capture"
    elif compile_vae:
        why = "compile_vae=True compiles the VAE where it was when compiled"
    elif fused_qkv:
        why = "fused_qkv=True keeps ralu's fused q/k/v weight copies on the accelerator"
    elif fp8:
        why = "precision='fp8' keeps ralu's fp8 weight copies on the accelerator"
    if why is not None:
        raise ValueError(f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} offloaded by "
                         f"enable_model_cpu_offload, which ralu runs with eager calls only: {why}. Run it eagerly "
                         "(backend='eager' without those options, as by default), or move the pipeline to its "
                         "device (pipe.remove_all_hooks(); pipe.to('cuda'))")


@contextlib.contextmanager
def keeping_models(vae):
    """Within the block, ``vae``'s offload hook moves the VAE to its device without offloading the model before it
    in the pipeline's order (the transformer, still needed by the call). The hook is as it was afterwards."""
    hook = offload_hook(vae)
    prev = getattr(hook, "prev_module_hook", None)
    if prev is None:
        yield
        return
    hook.prev_module_hook = None
    try:
        yield
    finally:
        hook.prev_module_hook = prev


def free_models(pipe) -> None:
    """Offload every model of ``pipe`` as its pipeline call ends (diffusers' ``maybe_free_model_hooks``), where
    ``enable_model_cpu_offload`` was called on it; nothing otherwise."""
    if getattr(pipe, "_all_hooks", None) and hasattr(pipe, "maybe_free_model_hooks"):
        pipe.maybe_free_model_hooks()
