"""Kernel implementations, one module per backend (see ndcls._registry)."""
