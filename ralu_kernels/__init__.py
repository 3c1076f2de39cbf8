"""ralu_kernels: Triton kernels (and their pure-torch references) used by the RALU runtime.

This package imports nothing from ``ralu_runtime``.
"""
