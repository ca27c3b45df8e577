"""Fine-tuning tasks: segmentation, change detection, scene classification."""
