"""Test setup for fastnft_kernels (needs only torch, triton and pytest).

Triton kernels run on a CPU only under Triton's interpreter, which must be switched on before
any kernel is defined: conftest.py is imported before the test modules import fastnft_kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
