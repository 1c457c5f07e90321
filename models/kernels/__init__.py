"""treespec's batch-invariant CPU kernels (C++ in csrc/) and the switch that routes a model's linear layers to them."""
