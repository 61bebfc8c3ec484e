"""Experiments that train and compare several methods (the demo, benchmarks)."""
