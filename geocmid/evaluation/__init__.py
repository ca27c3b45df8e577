"""Frozen-encoder evaluation: features, weighted k-NN, linear probe, and the run of a protocol."""
