"""Measuring: the side-by-side benchmark and its peers (HF, llama.cpp), held-out splits, reports, sweeps, tracking, tree pictures."""
