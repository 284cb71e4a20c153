"""The ground floor both sides stand on, torch-free: errors, the bundle manifest and its schema,
atomic file writes and state files."""
