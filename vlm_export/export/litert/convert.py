"""The bundle's image tower rebuilt in PyTorch from its manifest, converted to LiteRT.

Run as a child process by ``litert.build`` (``python -m vlm_export.export.litert.convert BUNDLE
OUT``), so litert-torch's logs and memory stay there. The tower is rebuilt from what the manifest
records: the open_clip model and its weights (a pretrained tag, found in the Hugging Face cache or
downloaded, or random weights drawn with the recorded ``random_seed``), the activation, and the
condensation (drop rate, merge centres, ranking, reduction blocks, class capacity, TopK or
TopK-free graph). litert-torch then lowers the PyTorch tower itself (TopK becomes TFLite's
TOPK_V2), with the manifest's input and output names as the graph's ``serving_default``
signature. Whether the rebuilt tower is the bundle's is not assumed: ``litert.build`` compares
the converted graph with the bundle's ONNX graph before keeping it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlm_export.core.errors import UserError
from vlm_export.core.manifest import read_manifest

#: weights files a bundle may have been exported from (not kept in the bundle)
CHECKPOINT_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".safetensors", ".ckpt"})
#: the exit status of a conversion refused with a one-line reason on stderr
REFUSED = 2


def condensation_config(manifest: dict[str, Any]) -> Any:
    """The ``CondensationConfig`` the manifest's ``condensation`` section records (None: full)."""
    from vlm_export.models.schedule import CondensationConfig

    section = manifest.get("condensation")
    if not section:
        return None
    return CondensationConfig(
        drop_rate=float(section["drop_rate"]),
        merge_centers=int(section["merge_centers"]),
        ranking=str(section["ranking"]),
        reduction_layers=tuple(int(layer) for layer in section["reduction_layers"]),
        topk_free=manifest["engine"].get("condensation_graph") == "topk-free",
    )


def tower_from_manifest(manifest: dict[str, Any]) -> Any:
    """The bundle's ``CondensingVisionTower`` (eval mode), rebuilt from its manifest."""
    from vlm_export.models.condensing_tower import CondensingVisionTower
    from vlm_export.models.loading import RANDOM_SEED, RANDOM_WEIGHTS, load_clip
    from vlm_export.models.weights_origin import FROM_FLAG

    model = manifest["model"]
    if model.get("untrained") and model.get("random_seed") != RANDOM_SEED:
        raise UserError(
            "this random-weight bundle does not record the seed of its weights (exported by an "
            "older vlm-export), so its tower cannot be rebuilt: export it again"
        )
    pretrained = RANDOM_WEIGHTS if model.get("untrained") else str(model["pretrained"])
    if Path(pretrained).suffix in CHECKPOINT_SUFFIXES:
        raise UserError(
            f"this bundle was exported from a checkpoint file ({pretrained}) that the manifest "
            "names but does not hold; build-litert rebuilds towers from open_clip tags and "
            "random weights only"
        )
    loaded = load_clip(
        str(model["name"]),
        pretrained,
        force_quick_gelu=model.get("activation_source") == FROM_FLAG,
        pretrained_tag=model.get("pretrained_tag"),
    )
    config = condensation_config(manifest)
    capacity = int(manifest["condensation"]["class_capacity"]) if config else None
    return CondensingVisionTower(loaded.model.visual, config, capacity).eval()


def convert_tower(tower: Any, out: Path, batch_size: int = 1) -> None:
    """Write ``tower`` (static ``batch_size``) as a LiteRT graph whose signature has the engine's
    tensor names."""
    import litert_torch
    import torch

    from vlm_export.export.graph.onnx_export import io_names

    inputs, outputs = io_names(tower)

    class NamedTower(torch.nn.Module):
        """The tower with named inputs and a dict of named outputs (the signature's names)."""

        def __init__(self) -> None:
            super().__init__()
            self.tower = tower

        def forward(self, **feeds: torch.Tensor) -> dict[str, torch.Tensor]:
            return dict(zip(outputs, self.tower(*[feeds[name] for name in inputs]), strict=True))

    example = dict(zip(inputs, tower.example_inputs(batch_size), strict=True))
    with torch.no_grad():
        litert_torch.convert(NamedTower().eval(), (), sample_kwargs=example).export(str(out))


def main(argv: Sequence[str] | None = None) -> int:
    """Rebuild BUNDLE's tower and write OUT; REFUSED with one line on stderr for a user mistake."""
    parser = argparse.ArgumentParser(prog="python -m vlm_export.export.litert.convert")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    from vlm_export.models.torchvision_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    manifest = read_manifest(args.bundle)
    try:
        tower = tower_from_manifest(manifest)
        convert_tower(tower, args.out, int(manifest["engine"]["batch_size"]))
    except UserError as exc:
        print(str(exc), file=sys.stderr)
        return REFUSED
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
