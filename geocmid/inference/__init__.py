"""geocmid.inference."""
