"""Shared test helpers: a snapshot of everything ralu could change on a user's pipeline, and its comparison.

``snapshot(pipe)`` records, for every ``torch.nn.Module`` component of a diffusers pipeline (transformer(s), VAE,
text encoders): each submodule's type, identity, training flag, compiled state, forward (pre-)hooks, diffusers hooks
and public attribute names; each parameter's identity and version counter; every state-dict value (cloned); the
attention processors' types and identities. Also the pipeline's attribute names, the scheduler's config and the global
torch RNG state.
``assert_same(before, after)`` fails naming what changed. ``running_server`` runs the HTTP app over a tiny engine
for the serving tests. ``dry_run_env()`` is the environment of a GPU-suite dry run started by a test.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

_SIMPLE = (int, float, str, bool, type(None), tuple)


def _diffusers_hooks(mod: torch.nn.Module) -> list | None:
    """``[(name, identity)]`` of the hooks in a module's diffusers hook registry (``enable_parallelism``'s
    context-parallel split / gather hooks, caches, group offloading), None without a registry."""
    registry = getattr(mod, "_diffusers_hook", None)
    return None if registry is None else [(name, id(hook)) for name, hook in registry.hooks.items()]


def _module_snapshot(mod: torch.nn.Module) -> dict:
    snap = {
        "modules": [(n, type(m), id(m), m.training, m._compiled_call_impl is not None,
                     [id(h) for h in m._forward_hooks.values()], [id(h) for h in m._forward_pre_hooks.values()],
                     _diffusers_hooks(m),
                     sorted(k for k in vars(m) if not k.startswith("_"))) for n, m in mod.named_modules()],
        "params": [(n, id(p), p._version) for n, p in mod.named_parameters()],
        "values": {n: t.detach().clone() for n, t in mod.state_dict().items()},
    }
    if hasattr(mod, "attn_processors"):
        snap["processors"] = {k: (type(v), id(v)) for k, v in mod.attn_processors.items()}
    return snap


def _attrs(obj) -> dict:
    """``{name: (identity, value where it is a plain value)}`` of an object's attributes."""
    return {k: (id(v), v if isinstance(v, _SIMPLE) else None) for k, v in vars(obj).items()}


def snapshot(pipe, *, extra: dict | None = None) -> dict:
    """Everything ralu could change on ``pipe`` (see the module docstring). ``extra``: ``{name: object}`` whose
    attributes are compared too (by identity, and by value where they are plain values), e.g. a guider or a RoPE
    embedder that keeps tables."""
    snap = {"pipe_attrs": sorted(vars(pipe)), "rng": torch.get_rng_state()}
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is not None:
        snap["scheduler"] = dict(scheduler.config)
    for name, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            snap[name] = _module_snapshot(comp)
    for name, obj in (extra or {}).items():
        snap[f"extra:{name}"] = _attrs(obj)
    return snap


def assert_same(a: dict, b: dict) -> None:
    """Fail, naming the component and what changed, unless snapshots ``a`` and ``b`` are equal."""
    assert a.keys() == b.keys(), f"components added or removed: {sorted(set(a) ^ set(b))}"
    assert torch.equal(a["rng"], b["rng"]), "the global torch RNG was advanced"
    for comp in a:
        if comp == "rng":
            continue
        if not isinstance(a[comp], dict) or comp in ("scheduler",) or comp.startswith("extra:"):
            assert a[comp] == b[comp], f"{comp} changed"
            continue
        for key in a[comp]:
            if key == "values":
                assert a[comp][key].keys() == b[comp][key].keys(), f"{comp}: parameters added or removed"
                for n in a[comp][key]:
                    assert torch.equal(a[comp][key][n], b[comp][key][n]), f"{comp}.{n} changed"
            else:
                assert a[comp][key] == b[comp][key], f"{comp}: {key} changed"


SERVE_DEFAULTS = dict(height=64, width=64, max_sequence_length=77)  # a served tiny engine's defaults (small: CPU time)


@contextlib.contextmanager
def diffusers_active_backend_restored():
    """diffusers' process-wide active attention backend put back on exit (a model's ``set_attention_backend()`` sets
    it for every model in the process; conftest fails a test that leaves it changed)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    try:
        yield
    finally:
        _AttentionBackendRegistry.set_active_backend(before)


@contextlib.contextmanager
def running_server(pipe, config=None, *, grace_s: float, stop_s: float, limits=None, **app_kwargs):
    """``ralu serve``'s app on 127.0.0.1:<free port> over a fresh engine of ``pipe`` (``config``: its
    EngineConfig, default a 50 ms gather timeout; :data:`SERVE_DEFAULTS`); yields ``(server, engine)`` and stops both
    on exit, failing when the server thread has not ended within ``stop_s`` seconds."""
    from ralu_runtime.serving import Engine, EngineConfig
    from ralu_runtime.serving.http import Server, create_app

    engine = Engine(pipe, config or EngineConfig(gather_timeout_s=0.05), **SERVE_DEFAULTS)
    server = None
    try:
        server = Server(create_app(engine, model_name="tiny-flux", **app_kwargs), "127.0.0.1", 0, grace_s=grace_s,
                        limits=limits).start(timeout=60)
        yield server, engine
    finally:
        stopped = server.stop(timeout=stop_s) if server is not None else True
        engine.shutdown(drain=False, timeout=30)
        assert stopped, "the server thread did not end"


def dry_run_env() -> dict:
    """The environment for ``python -m benchmarks.gpu_suite --dry-run`` in a subprocess: the test session's, without
    ``OUT`` / ``TRITON_INTERPRET`` / ``RALU_TEST_GPU`` (the suite sets what each step needs), and with this worker's
    torch thread count as ``OMP_NUM_THREADS`` (under pytest-xdist one thread per worker: two workers on two cores
    each running two threads doubled the dry runs' time)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET", "RALU_TEST_GPU")}
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    return env


# ---------------------------------------------------------------------------------------------- Triton interpreter
@functools.lru_cache(maxsize=None)
def interpreter_fma_rounds_once() -> bool:
    """Whether Triton's interpreter evaluates ``tl.fma`` with one rounding, as the GPU does (Triton 3.9 does;
    Triton 3.6's interpreter computes ``x * y + z`` in float32, two roundings). Probed with a one-element kernel
    where the two differ: ``fma(1 + 2^-12, 1 + 2^-12, -(1 + 2^-11)) = 2^-24``, twice rounded 0."""
    import triton
    import triton.language as tl

    @triton.jit
    def _fma(x_ptr, z_ptr, out_ptr):
        x = tl.load(x_ptr)
        tl.store(out_ptr, tl.fma(x, x, tl.load(z_ptr)))

    x = torch.tensor([1.0 + 2.0**-12])
    z = torch.tensor([-(1.0 + 2.0**-11)])
    out = torch.zeros(1)
    _fma[(1,)](x, z, out)
    return out.item() == 2.0**-24


def assert_kernel_matches_reference(out: torch.Tensor, ref: torch.Tensor) -> None:
    """A Triton kernel's output (under the interpreter) against its torch reference: bitwise, the reference
    evaluating the kernel's float32 expression with exact fused multiply-adds. Where the interpreter rounds
    ``tl.fma`` twice (:func:`interpreter_fma_rounds_once`), within two units in the last place of ``out``'s dtype
    (of the largest reference value near zero): a GPU compiles a real fma, where the bits are checked."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if interpreter_fma_rounds_once():
        assert torch.equal(out, ref), f"max diff {(out.float() - ref.float()).abs().max()}"
        return
    eps = torch.finfo(out.dtype).eps
    scale = ref.float().abs().max().item()
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 * eps, atol=2 * eps * scale)
