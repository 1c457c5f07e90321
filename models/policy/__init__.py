"""The tree policy: pruning strategies and the measured cost model they read."""
