"""Optional Triton import shared by the kernel modules: ``HAS_TRITON``, ``triton``, ``tl``, ``libdevice`` (None without it).

The torch references work without Triton; a broken Triton install (any import error) counts as absent.
"""
try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # noqa: BLE001
    triton = None
    tl = None
    HAS_TRITON = False

libdevice = None
if HAS_TRITON:
    try:  # CUDA libdevice wrappers (fast_logf, ...); only traced for compiled NVIDIA kernels
        from triton.language.extra.cuda import libdevice
    except Exception:  # noqa: BLE001
        libdevice = None

__all__ = ["HAS_TRITON", "libdevice", "tl", "triton"]
