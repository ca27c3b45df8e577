"""The products of trained models: segmentation, change, embeddings, classification."""
