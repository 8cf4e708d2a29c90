"""The Triton kernels run in the interpreter on CPU tensors: the flag must be set before
triton decorates them (i.e. before flexigpt_kernels.ops.triton is first imported)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
