"""ndcls: Dilated Convolution with Learnable Spacings, as array-level kernels.

``construct`` builds the dense kernel from element weights and positions; ``construct_grad``
back-propagates through it; ``conv`` and ``conv_grad`` convolve by that kernel without building it. Both take NumPy, CuPy, torch or any DLPack arrays and return the
caller's array type. Importing ndcls imports neither torch nor CuPy.
"""

from ndcls._api import construct, construct_grad, conv, conv_grad
from ndcls._registry import Backend, backends, default_backend, get_backend, register_backend
from ndcls._spec import EPS, INTERPOLATIONS, MAX_DIMS, ConvSpec, KernelSpec, gauss_cut

__version__ = "0.1.0"

__all__ = [
    "EPS",
    "INTERPOLATIONS",
    "MAX_DIMS",
    "Backend",
    "ConvSpec",
    "KernelSpec",
    "backends",
    "construct",
    "construct_grad",
    "conv",
    "conv_grad",
    "default_backend",
    "gauss_cut",
    "get_backend",
    "register_backend",
]
