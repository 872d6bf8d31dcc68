"""Layers shared by the vision tower, the language model and the action expert."""
