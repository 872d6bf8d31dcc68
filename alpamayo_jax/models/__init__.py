"""Pure NNX modules (no loops over time)."""
