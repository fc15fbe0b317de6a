"""bitnet_jax: BitNet and BitNet b1.58 in JAX / Flax NNX (quant -> layers -> model -> sharding -> train)."""
