"""``python -m vlm_export.runtime`` runs the ``vlm-edge`` command."""

from vlm_export.runtime.launch import entry  # installs the Ctrl-C handler before anything heavy

entry()
