"""GFLOPs of ViT-B/16 at 224 px agree with spec/tca.md, by closed form and by torch's counter."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from vlm_export.models.condensing_tower import CondensingVisionTower  # noqa: E402
from vlm_export.models.flops import (  # noqa: E402
    closed_form_gflops,
    counted_gflops,
    drop_rate_for_gflops,
)
from vlm_export.models.schedule import CondensationConfig, ScheduleError  # noqa: E402


@pytest.fixture(scope="module")
def vit_b16():
    from vlm_export.models.loading import load_clip

    return load_clip("ViT-B-16", "none").model.visual


@pytest.mark.parametrize(
    ("config", "expected", "schedule"),
    [
        (None, 17.56, [197] * 12),
        (CondensationConfig(0.035, 2), 15.44, [197] * 4 + [180] * 3 + [163] * 3 + [149] * 2),
        (CondensationConfig(0.1, 2), 11.67, [197] * 4 + [141] * 3 + [100] * 3 + [74] * 2),
        (CondensationConfig(0.035, 4), 15.69, None),
        (CondensationConfig(0.1, 4), 11.86, None),
    ],
)
def test_vit_b16_gflops_match_spec(vit_b16, config, expected, schedule):
    tower = CondensingVisionTower(vit_b16, config, num_classes=10)
    closed = closed_form_gflops(tower)
    assert closed == pytest.approx(expected, abs=0.05)
    # the counter runs the real graph, anchor token included; it must agree within the same bound
    assert counted_gflops(tower) == pytest.approx(
        closed_form_gflops(tower, with_anchor=True), abs=1e-3
    )
    assert counted_gflops(tower) == pytest.approx(expected, abs=0.05)
    if schedule is not None:
        assert tower.tokens_per_block == schedule


def test_target_gflops_search(vit_b16):
    config = CondensationConfig(0.035, 2)
    rate = drop_rate_for_gflops(vit_b16, config, 11.67)
    assert rate == pytest.approx(0.1, abs=0.002)
    tower = CondensingVisionTower(vit_b16, CondensationConfig(rate, 2))
    assert closed_form_gflops(tower) <= 11.67
    with pytest.raises(ScheduleError, match="not below"):
        drop_rate_for_gflops(vit_b16, config, 20.0)
    with pytest.raises(ScheduleError, match="no drop rate reaches"):
        drop_rate_for_gflops(vit_b16, config, 1.0)
