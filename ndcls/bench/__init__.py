"""Benchmarks shipped with ndcls (imported only by the benchmark scripts and `ndcls bench`)."""
