"""kernels: Pallas kernels for low-bit inference (quant -> layers -> model -> packing -> kernels -> generate).

`ternary_matmul` is the 2-bit weight kernel (decode inside the kernel); `matmul` dispatches to it on GPU/TPU and
to the XLA reference path (`reference_matmul`: unpack, then one dot) elsewhere. `words` is the word-interleaved
2-bit layout for int8 dot-product (dp4a) kernels, with its integer oracle `word_matvec`.
"""

from bitnet_jax.kernels.ternary_matmul import ACCELERATORS, matmul, reference_matmul, ternary_matmul

__all__ = ["ACCELERATORS", "matmul", "reference_matmul", "ternary_matmul"]
