"""The learned parts: affine alignment, per-node features, the acceptance predictor and the node scorer that runs them while drafting."""
