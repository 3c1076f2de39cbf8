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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is visible to torch")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


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
