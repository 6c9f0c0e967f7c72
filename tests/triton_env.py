"""Where Triton kernels run in tests: the GPU when there is one, else Triton's interpreter on CPU
tensors (tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton)."""

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
