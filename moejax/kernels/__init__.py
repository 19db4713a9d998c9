"""Pallas kernels for token dispatch (permute, unpermute-combine): ``moejax.kernels.dispatch``."""
