import os

import pytest
import torch

# The Triton kernels run on CPU tensors through Triton's interpreter when no
# GPU is present. The interpreter flag is read when a kernel is decorated, so
# it must be set before klkern.triton_kernels is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
