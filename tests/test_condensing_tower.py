"""The static-graph condensing tower equals the literal eager reference, token for token."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from reference_tca import reference_forward  # noqa: E402

from vlm_export.models.condensing_tower import CondensingVisionTower  # noqa: E402
from vlm_export.models.schedule import CondensationConfig, ScheduleError  # noqa: E402

NUM_CLASSES = 6


def _anchors(tower, generator, scale=1.0):
    shape = (NUM_CLASSES, len(tower.schedule), tower.geometry["width"])
    return torch.randn(shape, generator=generator) * scale


@pytest.mark.parametrize("ranking", ["mean", "consensus"])
@pytest.mark.parametrize("centers", [1, 2, 4])
@pytest.mark.parametrize("valid_mode", ["none", "all", "some"])
def test_static_tower_matches_reference(tiny_clip, ranking, centers, valid_mode):
    config = CondensationConfig(drop_rate=0.1, merge_centers=centers, ranking=ranking)
    tower = CondensingVisionTower(tiny_clip.model.visual, config, NUM_CLASSES).eval()
    generator = torch.Generator().manual_seed(centers * 7 + len(ranking))
    images = torch.randn(3, 3, 64, 64, generator=generator)
    anchors = _anchors(tower, generator)
    valid = {
        "none": torch.zeros(NUM_CLASSES),
        "all": torch.ones(NUM_CLASSES),
        "some": torch.tensor([0.0, 1, 0, 1, 0, 0]),
    }[valid_mode]
    with torch.no_grad():
        embedding, cls_stack, fate = tower(images, anchors, valid)
    for b in range(images.shape[0]):
        ref_embedding, ref_cls, ref_fate = reference_forward(
            tiny_clip.model.visual,
            images[b],
            0.1,
            centers,
            ranking,
            tower.reduction_layers,
            anchors,
            valid,
        )
        assert torch.equal(fate[b], ref_fate), "kept/merged/pruned sets differ"
        torch.testing.assert_close(cls_stack[b], ref_cls, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(embedding[b], ref_embedding, atol=2e-5, rtol=1e-4)


def test_masked_anchor_equals_ordinary_attention(tiny_clip):
    """anchors_valid = 0 must give exactly the tower without any anchor token."""
    config = CondensationConfig(drop_rate=0.1, merge_centers=2)
    tower = CondensingVisionTower(tiny_clip.model.visual, config, NUM_CLASSES).eval()
    generator = torch.Generator().manual_seed(3)
    image = torch.randn(1, 3, 64, 64, generator=generator)
    with torch.no_grad():
        big = tower(image, _anchors(tower, generator, 50.0), torch.zeros(NUM_CLASSES))
        zero = tower(image, torch.zeros(NUM_CLASSES, 3, 64), torch.zeros(NUM_CLASSES))
        injected = tower(image, _anchors(tower, generator, 50.0), torch.ones(NUM_CLASSES))
    for a, b in zip(big, zero, strict=True):
        assert torch.equal(a, b)
    assert not torch.allclose(big[0], injected[0]), "a valid anchor must change the result"


def test_full_tower_equals_open_clip(tiny_clip):
    tower = CondensingVisionTower(tiny_clip.model.visual, None).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        embedding, cls_stack = tower(images)
        expected = torch.nn.functional.normalize(tiny_clip.model.encode_image(images), dim=-1)
    torch.testing.assert_close(embedding, expected)
    assert cls_stack.shape == (2, 4, 64)


def test_fate_accounts_for_every_patch(tiny_clip):
    config = CondensationConfig(drop_rate=0.1, merge_centers=2)
    tower = CondensingVisionTower(tiny_clip.model.visual, config, NUM_CLASSES).eval()
    with torch.no_grad():
        _, _, fate = tower(*tower.example_inputs(2))
    for slot, counts in enumerate(tower.schedule):
        row = fate[0, slot]
        assert int((row == 0).sum()) <= counts.keep
        assert int((row == 1).sum()) <= counts.merge and int((row == 2).sum()) <= counts.prune
    first = fate[0, 0]
    first_counts = tower.schedule[0]
    assert [int((first == code).sum()) for code in (0, 1, 2)] == [
        first_counts.keep,
        first_counts.merge,
        first_counts.prune,
    ]
    # a patch gone at block i stays gone afterwards
    gone_before = fate[:, 0] != 0
    assert bool((fate[:, 1][gone_before] == -1).all())


def test_impossible_budget_names_layer_and_counts(tiny_clip):
    with pytest.raises(ScheduleError, match=r"block \d+.*keep=.*merge=.*prune="):
        CondensingVisionTower(tiny_clip.model.visual, CondensationConfig(drop_rate=0.45), 4)


def test_reduction_layers_out_of_range(tiny_clip):
    config = CondensationConfig(reduction_layers=(1, 7))
    with pytest.raises(ScheduleError, match="out of range"):
        CondensingVisionTower(tiny_clip.model.visual, config, 4)


def test_drop_rate_zero_keeps_every_token_and_equals_the_full_tower(tiny_clip):
    """A ladder's rung 0: pass-through reduction blocks; anchors off = the unmodified ViT."""
    config = CondensationConfig(drop_rate=0.0, merge_centers=2)
    tower = CondensingVisionTower(tiny_clip.model.visual, config, NUM_CLASSES).eval()
    full = CondensingVisionTower(tiny_clip.model.visual, None).eval()
    tokens = tower.geometry["num_tokens"]
    assert tower.tokens_per_block == [tokens] * tower.geometry["layers"]
    assert all(c.passthrough and c.tokens_out == tokens for c in tower.schedule)
    generator = torch.Generator().manual_seed(5)
    image = torch.randn(2, 3, 64, 64, generator=generator)
    anchors = _anchors(tower, generator)
    with torch.no_grad():
        embedding, cls_stack, fate = tower(image, anchors, torch.zeros(NUM_CLASSES))
        want_embedding, want_cls = full(image)
        _, anchored_cls, _ = tower(image, anchors, torch.ones(NUM_CLASSES))
    assert torch.equal(fate, torch.zeros_like(fate)), "every patch is kept at every block"
    torch.testing.assert_close(embedding, want_embedding, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(cls_stack, want_cls, atol=2e-5, rtol=1e-4)
    first = tower.reduction_layers[0]
    assert not torch.allclose(anchored_cls[:, first], want_cls[:, first]), "anchor injected"
