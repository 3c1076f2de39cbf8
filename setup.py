"""Build script for ralu.

Pure-Python install everywhere. The CUDA extension in ``csrc/`` is added by
``_cuda_extensions()`` when CUDA and nvcc are present (see README, "Building the CUDA ops").
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.11",  # the oldest torch the suite has run on (the GPU machine's); CI runs 2.13
    "diffusers==0.42.1",
    "transformers>=4.50",
    "tokenizers>=0.20",
    "safetensors",
    "numpy",
    "scipy>=1.10",
    "opencv-python-headless>=4.8",
    "pillow",
    "tqdm",
]

SERVE = ["fastapi>=0.110", "uvicorn>=0.30", "prometheus_client>=0.20",
         "python-multipart>=0.0.18"]  # ralu serve (ralu_runtime.serving.http); multipart: /v1/images/edits
RAY = ["ray[serve]>=2.60", *SERVE]  # ralu serve --ray (ralu_runtime.serving.ray; tested with ray 2.60)

EXTRAS = {
    "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "scikit-image>=0.22",
             "triton==3.9.0; platform_system == 'Linux'", "peft>=0.17", "onnx", "onnxruntime", *RAY, "httpx>=0.27",
             "openai>=1.0"],
    "triton": ["triton"],
    "onnx": ["onnx", "onnxruntime"],
    "serve": SERVE,
    "ray": RAY,
    "bench": ["matplotlib"],
}


def _cuda_extensions():
    """Return (ext_modules, cmdclass) for csrc/ when CUDA can be built, else ([], {}).

    Builds ``ralu_kernels._C`` (csrc/stage_transition.cu + csrc/torch_binding.cpp) when torch
    is a CUDA build, CUDA_HOME and nvcc are found and ``RALU_BUILD_CUDA`` is not "0".
    ``RALU_CUDA_ARCHS`` (default "8.0;9.0") picks the GPU architectures: SASS for each, plus
    PTX for the highest. ``RALU_FORCE_CUDA=1`` turns "cannot build" into an error.
    """
    import os
    import re
    import shutil
    import sys

    force = os.environ.get("RALU_FORCE_CUDA") == "1"

    def skip(reason):
        if force:
            raise RuntimeError(f"RALU_FORCE_CUDA=1 but the CUDA extension ralu_kernels._C cannot be built: {reason}")
        print(f"ralu: building without the CUDA extension ({reason})", file=sys.stderr)
        return [], {}

    if os.environ.get("RALU_BUILD_CUDA") == "0":
        return skip("RALU_BUILD_CUDA=0")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # torch missing or broken
        return skip(f"torch.utils.cpp_extension not importable: {exc}")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is not a CUDA build")
    if not CUDA_HOME:
        return skip("CUDA_HOME not found")
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    if not (os.path.exists(nvcc) or shutil.which("nvcc")):
        return skip(f"nvcc not found under {CUDA_HOME} or on PATH")

    archs = [a for a in re.split(r"[;,\s]+", os.environ.get("RALU_CUDA_ARCHS", "8.0;9.0")) if a]
    if not archs:
        return skip("RALU_CUDA_ARCHS is empty")
    gencode, numeric = [], []
    for arch in archs:
        m = re.fullmatch(r"(\d+)\.?(\d)([af]?)(\+PTX)?", arch.strip())
        if m is None:
            raise ValueError(f"RALU_CUDA_ARCHS: cannot parse {arch!r} (use e.g. '8.0;9.0' or '80;90a')")
        cc = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        gencode.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        numeric.append((int(m.group(1)) * 10 + int(m.group(2)), cc))
        if m.group(4):
            gencode.append(f"-gencode=arch=compute_{cc},code=compute_{cc}")
    top = max(numeric)[1]
    ptx_top = f"-gencode=arch=compute_{top},code=compute_{top}"
    if ptx_top not in gencode:
        gencode.append(ptx_top)

    here = os.path.dirname(os.path.abspath(__file__))
    ext = CUDAExtension(
        name="ralu_kernels._C",
        sources=["csrc/stage_transition.cu", "csrc/torch_binding.cpp"],
        include_dirs=[os.path.join(here, "csrc")],
        # Accurate math on purpose (bitwise agreement with Triton's tl.randn): no fast-math.
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", *gencode]},
    )
    return [ext], {"build_ext": BuildExtension}


def _version(base="0.1.0"):
    """Package version; builds with the CUDA extension carry a local tag, e.g. 0.1.0+cu130torch2.11."""
    if not ext_modules:
        return base
    import re

    import torch

    cuda = torch.version.cuda.replace(".", "")
    torch_mm = ".".join(re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    return f"{base}+cu{cuda}torch{torch_mm}"


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="ralu",
    version=_version(),
    description="Region-Adaptive Latent Upsampling (RALU) for diffusion transformers: runtime and kernels",
    packages=find_packages(include=["ralu_runtime", "ralu_runtime.*", "ralu_kernels", "ralu_kernels.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["ralu=ralu_runtime.cli:main"]},
)
