"""alpamayo-jax: a pure-JAX reimplementation of NVIDIA's Alpamayo-R1 driving model."""

__version__ = "0.1.0"
