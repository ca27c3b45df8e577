"""Self-supervised pretraining tasks: CMID and GeRSP."""
