"""Frames in and out: sources (images, video, cameras), the newest-frame capture thread,
preprocessing as the manifest describes it, and the ``--show`` window."""
