"""Pallas kernels: token dispatch (permute, unpermute-combine; ``moejax.kernels.dispatch``) and the dequantising
grouped matmul of quantised decoding's routed experts (``moejax.kernels.quant_gmm``)."""
