"""Frames from sources to decisions: capture, scheduling, lanes, rates and the recent buffer."""
