"""Compatibility shim for running the kernels under ``TRITON_INTERPRET=1`` on the CPU.

Triton 3.6's interpreter holds scalars as shape-``(1,)`` numpy arrays and converts them
with ``int(array)`` when they bound a ``range`` loop; numpy >= 2.3 refuses that for
arrays with ``ndim > 0``. Every kernel here loops over data-dependent bounds, so we make
``__index__`` read the single element instead. Its ``tl.dot`` also multiplies bfloat16
operands as their raw uint16 bit patterns; we widen them to float32 first (exact).
Nothing changes when compiling for a GPU.
"""

from __future__ import annotations

import os


def patch_interpreter() -> None:
    """Idempotently fix scalar ``__index__`` in the Triton interpreter (no-op otherwise)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    if getattr(interpreter, "_mosaickv_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    dot = interpreter.InterpreterBuilder.create_dot

    def widen(h):  # type: ignore[no-untyped-def]
        if h.dtype.scalar != tl.bfloat16:
            return h
        data = (h.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # type: ignore[no-untyped-def]
        return dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot
    interpreter._mosaickv_patched = True
