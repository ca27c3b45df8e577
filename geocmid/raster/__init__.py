"""Raster primitives: opening, validation, band selection, statistics."""
