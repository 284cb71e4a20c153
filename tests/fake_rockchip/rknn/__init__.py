"""Test double of rknn-toolkit2 (see tests/fake_rockchip/README.md)."""
