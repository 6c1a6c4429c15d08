"""Triton kernels for mixed-format segments (FlashInfer-style plan/run)."""
