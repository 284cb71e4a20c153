"""Open vocabulary on the device: class lists and prompt templates (shared with the exporter)."""
