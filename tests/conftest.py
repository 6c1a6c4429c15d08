"""Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen
before any kernel module is imported (the SGLang plugin imports them too)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
