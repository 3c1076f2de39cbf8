"""Optional Triton import shared by the kernel modules: ``HAS_TRITON``, ``triton``, ``tl`` (None without it).

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

__all__ = ["HAS_TRITON", "tl", "triton"]
