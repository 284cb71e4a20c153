"""`vlm-export quantize`: calibration images, INT8 graphs (QDQ, NNCF), the fidelity gate."""
