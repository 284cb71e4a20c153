"""Test double of rknn-toolkit-lite2 (see tests/fake_rockchip/README.md)."""
