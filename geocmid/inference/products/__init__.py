"""inference/products"""
