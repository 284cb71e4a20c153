"""`vlm-export build-rknn`: a Rockchip NPU graph by rknn-toolkit2, checked in its simulator."""
