"""ndcls: Dilated Convolution with Learnable Spacings, as array-level kernels.

``construct`` builds the dense kernel from element weights and positions; ``construct_grad``
back-propagates through it. Both take NumPy, CuPy, torch or any DLPack arrays and return the
caller's array type. Importing ndcls imports neither torch nor CuPy.
"""

from ndcls._api import construct, construct_grad
from ndcls._registry import Backend, backends, default_backend, get_backend, register_backend
from ndcls._spec import EPS, INTERPOLATIONS, MAX_DIMS, KernelSpec

__version__ = "0.1.0"

__all__ = [
    "EPS",
    "INTERPOLATIONS",
    "MAX_DIMS",
    "Backend",
    "KernelSpec",
    "backends",
    "construct",
    "construct_grad",
    "default_backend",
    "get_backend",
    "register_backend",
]
