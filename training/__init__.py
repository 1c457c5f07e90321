"""What makes and measures treespec's parts: drafts (training.drafts), the learned core (training.learned),
experiments (training.experiments). Imports run scripts -> training -> speculative_decoder -> models."""
