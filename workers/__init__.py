"""Datasets, models, the training loop and the trial task that run on the workers."""
