"""fedlora_jax: a vectorized JAX simulator of adaptive federated sketched LoRA."""

__version__ = "0.1.0"
