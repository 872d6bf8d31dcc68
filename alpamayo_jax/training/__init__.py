"""Supervised fine-tuning: optimizer, schedule and trainable-parameter selection."""
