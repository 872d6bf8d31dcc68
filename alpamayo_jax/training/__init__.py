"""Supervised fine-tuning: the stage-1 (VLM) and stage-2 (action expert) losses, optimizer, schedule,
trainable-parameter selection, data order, the training loop and its memory."""
