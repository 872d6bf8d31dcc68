"""Open-loop evaluation: trajectory metrics (`metrics`, pure jax.numpy) and figures (`plots`, matplotlib).

`metrics` does not import matplotlib; import `alpamayo_jax.evaluation.plots` for the figures.
"""
