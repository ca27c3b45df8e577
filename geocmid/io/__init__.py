"""geocmid.io."""
