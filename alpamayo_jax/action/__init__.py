"""Unicycle action space and trajectory tokenizers."""
