"""geocmid.data."""
