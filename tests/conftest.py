"""Test configuration: everything runs on a CPU.

Triton kernels run under the interpreter (``TRITON_INTERPRET=1``) unless the session asks
for the GPU with ``RALU_TEST_GPU=1``. The variable must be set before triton is imported.
"""
import os

if os.environ.get("RALU_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist every worker gets its share of the cores (2 workers on 2 cores: one thread each), so the
# workers do not oversubscribe the machine.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


# The files that take longest on a 2-core CPU (seconds per file, measured 2026-12-07 at 064b10b, one worker each:
# serving_ray 213, compiled_graphs 131, gpu_suite 121 with its dry run, safety 77, families 76, context_parallel 61,
# cli 58, compile 53, transition_kernel 45, csrc 40, video_shapes 38). pytest-xdist's --dist loadfile hands out whole
# files in collection order once its reordering by test count is off: the longest go first, so that no worker is
# left with a long file while the other has finished (xdist's own order put the two GPU-suite dry runs last).
LONGEST_FIRST = ("test_serving_ray.py", "test_compiled_graphs.py", "test_gpu_suite.py", "test_safety.py",
                 "test_families.py", "test_context_parallel.py", "test_cli.py", "test_compile.py",
                 "test_transition_kernel.py", "test_csrc.py", "test_video_shapes.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order set below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is visible to torch")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _diffusers_attention_backend():
    """diffusers' process-wide active attention backend: its name, or None where diffusers' dispatch is not imported
    yet (the default then, the environment's DIFFUSERS_ATTN_BACKEND or native)."""
    import sys

    dispatch = sys.modules.get("diffusers.models.attention_dispatch")
    return None if dispatch is None else str(getattr(dispatch._AttentionBackendRegistry._active_backend, "value",
                                                     dispatch._AttentionBackendRegistry._active_backend))


@pytest.fixture(autouse=True)
def _process_wide_attention_backend_left_as_found():
    """A test that leaves diffusers' active attention backend changed (a model's ``set_attention_backend()`` sets it
    for the whole process) errors here, and the backend is restored: later tests in the same worker would otherwise
    run other attention kernels (an SD3 bitwise test failed CI at c46087a so, in another file's worker)."""
    before = _diffusers_attention_backend()
    yield
    after = _diffusers_attention_backend()
    if after is None:
        return
    if before is None:
        before = os.environ.get("DIFFUSERS_ATTN_BACKEND", "native")
    if after != before:
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

        _AttentionBackendRegistry.set_active_backend(AttentionBackendName(before))
        pytest.fail(f"the test left diffusers' process-wide attention backend at {after!r} (was {before!r}): "
                    "restore it (a model's set_attention_backend() sets it for every model)")


# torch's process-wide settings that change which kernels run or what they compute: (read, restore) per setting
_TORCH_SETTINGS = {
    "default dtype": (torch.get_default_dtype, torch.set_default_dtype),
    "grad mode": (torch.is_grad_enabled, torch.set_grad_enabled),
    "threads": (torch.get_num_threads, torch.set_num_threads),
    "deterministic algorithms": (torch.are_deterministic_algorithms_enabled, torch.use_deterministic_algorithms),
    "float32 matmul precision": (torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
    "flash SDPA": (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.enable_flash_sdp),
    "efficient SDPA": (torch.backends.cuda.mem_efficient_sdp_enabled, torch.backends.cuda.enable_mem_efficient_sdp),
    "math SDPA": (torch.backends.cuda.math_sdp_enabled, torch.backends.cuda.enable_math_sdp),
    "cuDNN SDPA": (torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.enable_cudnn_sdp),
}


@pytest.fixture(autouse=True)
def _torch_settings_left_as_found():
    """A test that leaves one of torch's process-wide settings changed (:data:`_TORCH_SETTINGS`) errors here, and
    the setting is restored, so that no later test in the same worker runs under it."""
    before = {name: get() for name, (get, _set) in _TORCH_SETTINGS.items()}
    yield
    changed = []
    for name, (get, put) in _TORCH_SETTINGS.items():
        if get() != before[name]:
            changed.append(f"{name} {get()!r} (was {before[name]!r})")
            put(before[name])
    if changed:
        pytest.fail("the test left torch's process-wide settings changed: " + "; ".join(changed))


@pytest.fixture(scope="module")
def flux_pipe():
    """A tiny random FLUX pipeline (seed 0), one per test module."""
    from ralu_runtime.tiny import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(seed=0)


@pytest.fixture(scope="module")
def sd3_pipe():
    """A tiny random SD3 pipeline (seed 0), one per test module."""
    from ralu_runtime.tiny import build_tiny_sd3_pipeline

    return build_tiny_sd3_pipeline(seed=0)
