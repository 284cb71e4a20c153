"""Classes changed on a running service (the text engine of a bundle exported from the tiny
model): the bundle is rewritten as ``vlm-edge classes`` rewrites it, the next frames use the new
classes, each source's state follows its labels, and text embeddings come back normalised."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from fakebundle import write_images
from polling import wait_until

pytest.importorskip("prometheus_client")
pytest.importorskip("torch")

from test_edge_classes import EXPORTED, TEMPLATES, _export  # noqa: E402

from vlm_export.core.errors import UserError  # noqa: E402
from vlm_export.runtime.bundle import Bundle  # noqa: E402
from vlm_export.runtime.serve.config import ServeSettings  # noqa: E402
from vlm_export.runtime.serve.service import Service  # noqa: E402
from vlm_export.runtime.tca.stage import build_reservoir  # noqa: E402

pytestmark = pytest.mark.exporter


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve-classes")
    (folder / "templates.txt").write_text(TEMPLATES)
    return _export(folder / "tca", "tca", EXPORTED, str(folder / "templates.txt"))


def _settings(bundle: Path, tmp_path: Path, loop: bool) -> ServeSettings:
    write_images(tmp_path / "front", 4, seed=1, suffix=".png")
    write_images(tmp_path / "back", 3, seed=2, suffix=".png")
    return ServeSettings(
        bundle=str(bundle),
        sources=[("front", str(tmp_path / "front")), ("back", str(tmp_path / "back"))],
        loop=loop,
        state_dir=str(tmp_path / "states"),
    )


def _status(service: Service) -> dict[str, dict]:
    return {s["name"]: s for s in service.source_status()}


def test_states_follow_labels_and_the_bundle_is_rewritten(exported, tmp_path) -> None:
    bundle = Path(shutil.copytree(exported, tmp_path / "bundle"))
    new = ["dog", "red fox", "cat", "sea lion"]
    with Service.open(_settings(bundle, tmp_path, loop=False)) as service:
        assert service.classes()["classes"] == EXPORTED
        wait_until(lambda: set(service.states().values()) == {"stopped"}, "both sources ended")
        before = {name: s["reservoir_fill"] for name, s in _status(service).items()}
        reply = service.set_classes(new)
        assert reply["classes"] == new
        assert reply["dropped_entries"] == before["front"]["bird"] + before["back"]["bird"]
        after = {name: s["reservoir_fill"] for name, s in _status(service).items()}
        for name in ("front", "back"):
            assert after[name] == {
                "dog": before[name]["dog"],
                "red fox": 0,
                "cat": before[name]["cat"],
                "sea lion": 0,
            }
        record = service.classify(_image(), source="back", adapt=True)
        assert record["class"] in new
        vectors = np.array(service.embed_texts(["a photo of a dog", "a red fox"]))
        assert vectors.shape[0] == 2 and np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
        for bad in ([], ["dog", "dog"], [""]):
            with pytest.raises(UserError):
                service.set_classes(bad)
        assert service.classes()["classes"] == new  # refused changes left them alone
        assert service.set_classes(["cat", "dog"])["classes"] == ["cat", "dog"]  # twice in a row
    on_disk = Bundle.open(bundle)
    assert on_disk.classes == ["cat", "dog"]
    for name in ("front", "back"):
        reservoir = build_reservoir(on_disk, None, tmp_path / "states" / f"{name}.npz")
        assert reservoir.num_classes == 2


def test_the_next_frames_use_the_new_classes(exported, tmp_path) -> None:
    bundle = Path(shutil.copytree(exported, tmp_path / "bundle"))
    with Service.open(_settings(bundle, tmp_path, loop=True)) as service:
        wait_until(lambda: _status(service)["front"]["frames"] >= 5, "frames on the old classes")
        service.set_classes(["red fox", "sea lion"])
        seen = _status(service)["front"]["frames"]
        wait_until(lambda: _status(service)["front"]["frames"] > seen + 3, "more frames")
        status = _status(service)
        for name in ("front", "back"):
            assert status[name]["last"]["class"] in ("red fox", "sea lion")


def _image():
    from PIL import Image

    return Image.new("RGB", (64, 48), (120, 80, 40))
