"""What a new user meets first: compiled-kernel reuse, argument errors, torch tensors given to the
array API, the README's snippets."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ndcls
from ndcls.kernels import cpu

ROOT = Path(__file__).resolve().parents[1]


def _arrays(interpolation, dtype=np.float32, batch=3):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((batch, 1, 4)).astype(dtype)
    p = (rng.random((2, batch, 1, 4)) * 5 + 0.5).astype(dtype)
    s = None if interpolation == "bilinear" else np.full_like(p, 0.8)
    return w, p, s


@pytest.mark.parametrize("interpolation", ["bilinear", "gauss"])
def test_read_only_inputs_reuse_the_compiled_kernels(interpolation):
    w, p, s = _arrays(interpolation)
    K = ndcls.construct(w, p, (7, 7), sigma=s, interpolation=interpolation)
    G = np.linspace(-1, 1, K.size, dtype=K.dtype).reshape(K.shape)
    grads = ndcls.construct_grad(G, w, p, (7, 7), sigma=s, interpolation=interpolation)
    compiled = dict(cpu._COMPILED)
    for x in (w, p, s, G):
        if x is not None:
            x.flags.writeable = False
    K_ro = ndcls.construct(w, p, (7, 7), sigma=s, interpolation=interpolation)
    grads_ro = ndcls.construct_grad(G, w, p, (7, 7), sigma=s, interpolation=interpolation)
    assert cpu._COMPILED == compiled  # nothing new compiled for read-only arrays
    np.testing.assert_array_equal(K_ro, K)
    for g, g_ro in zip(grads, grads_ro):
        if g is not None:
            np.testing.assert_array_equal(g_ro, g)


@pytest.mark.parametrize("interpolation", ["bilinear", "triangle", "gauss"])
def test_serial_and_parallel_kernels_agree(interpolation, monkeypatch):
    w, p, s = _arrays(interpolation, np.float64, batch=9)
    G = np.random.default_rng(2).standard_normal((9, 1, 7, 7))
    results = {}
    for threshold in (1 << 62, 0):  # never parallel, always parallel
        monkeypatch.setattr(cpu, "PARALLEL_MIN_WORK", threshold)
        K = ndcls.construct(w, p, (7, 7), sigma=s, interpolation=interpolation)
        grads = ndcls.construct_grad(G, w, p, (7, 7), sigma=s, interpolation=interpolation)
        results[threshold] = (K,) + tuple(g for g in grads if g is not None)
    variants = {key[1] for key in cpu._COMPILED if key[0] == "_construct"}
    if cpu.numba.get_num_threads() > 1:
        assert variants == {False, True}
    for a, b in zip(results[1 << 62], results[0]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
