"""Benchmarks: the data path in the kernel (datapath) and the lab end to end (lab)."""
