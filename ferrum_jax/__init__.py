"""ferrum-jax: a JAX/XLA executor for decoder-only LLMs."""
