"""Lightning data modules: patches for pretraining and fine-tuning, sharded by rank."""
