"""Class capacity: a condensing engine with K anchor rows gives, for C <= K classes, what an
engine exported for exactly C gives; the runtime pads to K and refuses more than K in one line."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from vlm_export.core.errors import UserError  # noqa: E402
from vlm_export.models.condensing_tower import CondensingVisionTower  # noqa: E402
from vlm_export.models.schedule import CondensationConfig  # noqa: E402

CLASSES = 5
CAPACITY = 40


def _padded(anchors: torch.Tensor, valid: torch.Tensor, rows: int):
    pad = rows - anchors.shape[0]
    return (
        torch.cat([anchors, anchors.new_zeros(pad, *anchors.shape[1:])]),
        torch.cat([valid, valid.new_zeros(pad)]),
    )


@pytest.mark.parametrize("valid_mode", ["none", "some", "all"])
def test_tower_at_capacity_equals_tower_at_exactly_c(tiny_clip, valid_mode):
    config = CondensationConfig(drop_rate=0.1, merge_centers=2)
    exact = CondensingVisionTower(tiny_clip.model.visual, config, CLASSES).eval()
    roomy = CondensingVisionTower(tiny_clip.model.visual, config, CAPACITY).eval()
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        _, cls_stack, _ = exact(images, *[torch.zeros_like(t) for t in exact.example_inputs()[1:]])
    rows = cls_stack[:, [layer - 1 for layer in exact.reduction_layers]]
    # class anchors near the images' own CLS tokens, so that the choice among classes matters
    anchors = rows[torch.arange(CLASSES) % 2] + 0.3 * rows.std() * torch.randn(
        CLASSES, *rows.shape[1:], generator=generator
    )
    valid = {
        "none": torch.zeros(CLASSES),
        "some": torch.tensor([0.0, 1, 0, 1, 0]),
        "all": torch.ones(CLASSES),
    }[valid_mode]
    with torch.no_grad():
        want = exact(images, anchors, valid)
        got = roomy(images, *_padded(anchors, valid, CAPACITY))
    assert torch.equal(got[2], want[2]), "token fates differ"
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)


def test_export_refuses_a_capacity_below_the_class_count(tmp_path, capsys):
    from vlm_export.export.cli import main

    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\nbird\n")
    base = ["--method", "tca", "--model", "vlm-test-tiny", "--pretrained", "none", "--quiet"]
    base += ["--templates", "single", "--classes", str(classes)]
    assert main([*base, "--max-classes", "2", "--out", str(tmp_path / "small")]) == 2
    assert "--max-classes 2 is below the 3 classes" in capsys.readouterr().err
    assert not (tmp_path / "small").exists()


def test_runtime_pads_to_capacity_and_refuses_more(tmp_path):
    """The reservoir's anchors have the capacity's rows; more classes than that is one line."""
    from vlm_export.runtime.tca.reservoir import TokenReservoir
    from vlm_export.runtime.tca.reservoir_config import ReservoirConfig

    reservoir = TokenReservoir(3, 4, 8, [1, 2], ReservoirConfig(anchor_rule="per_class"), 10)
    rng = np.random.default_rng(0)
    reservoir.update(np.array([0.0, 5.0, 0.0]), rng.standard_normal((4, 8)).astype(np.float32))
    anchors, valid = reservoir.anchors()
    assert anchors.shape == (10, 2, 8) and valid.tolist() == [0, 1] + [0] * 8
    assert not anchors[3:].any()
    with pytest.raises(UserError, match="11 classes do not fit .* capacity 10"):
        TokenReservoir(11, 4, 8, [1, 2], anchor_rows=10)
