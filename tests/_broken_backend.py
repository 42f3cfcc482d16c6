"""A backend with a planted error, for testing that ``ndcls check`` fails on disagreement:
the reference, except that one cell of every kernel is off by 1e-3 and grad_sigma is negated."""

import numpy as np

from ndcls.kernels import reference


def construct(spec, weight, positions, sigma, out=None):
    kernel = reference.construct(spec, weight, positions, sigma, out)
    if kernel.size:
        kernel[:, -1] += np.asarray(1e-3, dtype=kernel.dtype)
    return kernel


def construct_grad(spec, grad_kernel, weight, positions, sigma):
    gw, gp, gs = reference.construct_grad(spec, grad_kernel, weight, positions, sigma)
    return gw, gp, None if gs is None else -gs
