"""mtl_jax: multi-task sentence models on a shared BERT backbone, in pure-functional JAX."""

__version__ = "0.1.0"
