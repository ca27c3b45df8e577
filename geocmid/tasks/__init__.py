"""geocmid.tasks."""
