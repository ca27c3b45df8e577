"""geocmid.models."""
