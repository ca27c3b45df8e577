"""Training runs: run folders, the pretraining and fine-tuning runners, their artefacts."""
