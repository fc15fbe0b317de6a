"""interop: checkpoints of other frameworks in and out of bitnet_jax (model -> interop).

`bitnet_jax.interop.hf`: Hugging Face transformers checkpoints (BitNet b1.58 2B4T layout, LLaMA layout).
Each submodule imports its optional dependencies (requirements-interop.txt) only where it needs them.
"""
