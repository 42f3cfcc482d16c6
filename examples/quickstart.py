"""Build a DCLS kernel, check it against the reference, back-propagate, and say what happened.

    python examples/quickstart.py
"""

import numpy as np

import ndcls

rng = np.random.default_rng(0)
out_channels, count, sizes = 4, 6, (9, 9)

weight = rng.standard_normal((out_channels, 1, count)).astype(np.float32)  # (*batch, count)
positions = (rng.random((2, out_channels, 1, count)) * 8).astype(np.float32)  # (M, *batch, count)
sigma = np.full_like(positions, 0.8)

for interpolation in ndcls.INTERPOLATIONS:
    kw = dict(sigma=None if interpolation == "bilinear" else sigma, interpolation=interpolation)
    kernel = ndcls.construct(weight, positions, sizes, **kw)  # (4, 1, 9, 9), Numba CPU backend
    reference = ndcls.construct(weight, positions, sizes, backend="numpy", **kw)
    grads = ndcls.construct_grad(np.ones_like(kernel), weight, positions, sizes, **kw)
    mass = float(np.abs(kernel.sum(axis=(2, 3)) - weight.sum(axis=2)).max())
    print(
        f"{interpolation:8s}: K {kernel.shape} {kernel.dtype}, "
        f"max |numba - reference| = {np.abs(kernel - reference).max():.1e}, "
        f"max |sum K - sum w| = {mass:.1e}, grad shapes {[None if g is None else g.shape for g in grads]}"
    )

print("\nbilinear kernel of output channel 0 (rounded):")
print(np.round(ndcls.construct(weight, positions, sizes)[0, 0], 2))
