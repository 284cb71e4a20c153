"""TCA on the device: the token reservoir and the pipeline stage that feeds its anchors back."""
