"""Patch samplers: nodata-aware random patches, shares of a data set per DDP rank."""
