"""Test setup. Triton kernels run on CPU only under its interpreter, which must be switched on
before any kernel is defined, so this runs before the tests import fastnft_kernels."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
