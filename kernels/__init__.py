"""Pallas kernels for token dispatch, installed as ``moejax.kernels``."""
