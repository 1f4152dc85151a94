"""Python front of the compiled ops: typed wrappers, fake kernels and autograd.

Everything here calls ``torch.ops.sparsebert.*``; see csrc/registration.cpp for the schemas.
"""
from . import mask as _mask
from . import masked_linear as _masked_linear
from . import optim_step as _optim_step
from . import select as _select
from . import sparse_linear as _sparse_linear
from . import topk as _topk
from .mask import *  # noqa: F401,F403
from .masked_linear import *  # noqa: F401,F403
from .optim_step import *  # noqa: F401,F403
from .select import *  # noqa: F401,F403
from .sparse_linear import *  # noqa: F401,F403
from .topk import *  # noqa: F401,F403

__all__ = [*_mask.__all__, *_masked_linear.__all__, *_optim_step.__all__, *_select.__all__, *_sparse_linear.__all__,
           *_topk.__all__]
