"""Python front of the compiled ops: typed wrappers, fake kernels and autograd.

Everything here calls ``torch.ops.sparsebert.*``; see csrc/registration.cpp for the schemas.
"""
from .mask import mask_nnz, pack_mask, unpack_mask
from .masked_linear import *  # noqa: F401,F403
from .optim_step import *  # noqa: F401,F403
from .sparse_linear import *  # noqa: F401,F403
from .topk import *  # noqa: F401,F403
