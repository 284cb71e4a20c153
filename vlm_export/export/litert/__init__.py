"""`vlm-export build-litert`: the tower rebuilt and lowered by litert-torch, checked, added."""
