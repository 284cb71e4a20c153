"""Pictures drawn with PIL alone (the device has no plotting library)."""
