"""Training: datasets, batches, the trainer, and the memory/time estimate."""
