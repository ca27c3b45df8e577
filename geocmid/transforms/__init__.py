"""Batch augmentations on the device, and per-rank random streams for them."""
