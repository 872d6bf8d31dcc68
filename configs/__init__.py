"""Preset configuration files (Hugging Face layout), installed as package data."""
