"""Datasets: GeoRasterDataset, labels, pairs, change patches and chips."""
