"""Driving data: the PhysicalAI-AV dataset read from a local root (`physical_ai_av`), a synthetic
dataset in the same layout (`synthetic_dataset`), and batches of clips for training and
evaluation (`iterator`). Reading and writing the dataset needs the optional extra `data`
(`pip install 'alpamayo-jax[data]'`), imported on first use; iterating over `.npz` clip files
does not."""
