"""``python -m vlm_export.runtime`` runs the ``vlm-edge`` command."""

from vlm_export.runtime.launch import entry

entry()
