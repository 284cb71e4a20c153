"""Preprocessing without torch: parity with open_clip's transform, BGR frames, modes, bad files.

The open_clip parity checks are exact (``assert_array_equal``): both sides run the same PIL resize,
crop/pad and ``convert("RGB")``, and the normalisation table computes ``(v / 255 - mean) / std`` in
float32 exactly as ToTensor + Normalize do, so no tolerance is needed anywhere in this file.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_export.core.errors import UserError
from vlm_export.runtime.io.preprocess import ImageError, Preprocessor, load_image, to_8bit

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
MODES = ("RGB", "L", "RGBA", "LA", "P", "1", "CMYK")
SIZES = [(1, 1), (4, 61), (61, 4), (63, 64), (64, 64), (65, 65), (97, 131), (300, 211), (480, 640)]


def _config(size, resize_mode="shortest", fill_color=0, interpolation="bicubic") -> dict:
    return {
        "size": list(size),
        "resize_mode": resize_mode,
        "interpolation": interpolation,
        "mean": MEAN,
        "std": STD,
        "fill_color": fill_color,
    }


def _image(rng: np.random.Generator, height: int, width: int, mode: str) -> Image.Image:
    rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    if mode == "RGBA":
        return rgba
    if mode == "P":
        return rgba.convert("RGB").quantize(32)
    return rgba.convert(mode)


@pytest.fixture(scope="module")
def open_clip():
    try:
        from vlm_export.models import loading  # registers vlm-test-tiny, fixes torchvision
    except ImportError as exc:  # pragma: no cover - depends on the environment
        pytest.skip(f"open_clip not importable: {exc}")
    loading.torch.set_num_threads(1)  # tiny tensors: worker threads only contend on shared cores
    return loading.open_clip


def _reference(open_clip, size, resize_mode="shortest", fill_color=0, interpolation="bicubic"):
    image_size = size[0] if size[0] == size[1] else tuple(size)
    return open_clip.image_transform(
        image_size,
        is_train=False,
        mean=MEAN,
        std=STD,
        resize_mode=resize_mode,
        interpolation=interpolation,
        fill_color=fill_color,
    )


@pytest.fixture(scope="module")
def images() -> list[tuple[tuple[int, int, str], Image.Image]]:
    rng = np.random.default_rng(0)
    return [((h, w, mode), _image(rng, h, w, mode)) for h, w in SIZES for mode in MODES]


def test_matches_tiny_model_transform(open_clip, images) -> None:
    model, _, reference = open_clip.create_model_and_transforms("vlm-test-tiny")
    cfg = open_clip.get_model_preprocess_cfg(model)
    ours = Preprocessor(_config(open_clip.transform.to_2tuple(cfg["size"])))
    assert ours.size == (64, 64)
    for case, image in images:
        got = ours(image)
        assert got.shape == (3, 64, 64) and got.dtype == np.float32
        np.testing.assert_array_equal(got, reference(image).numpy(), err_msg=str(case))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize(
    ("size", "resize_mode"),
    [
        ((224, 224), "shortest"),
        ((96, 128), "shortest"),
        ((128, 96), "shortest"),
        ((224, 224), "squash"),
        ((96, 128), "longest"),
        ((64, 64), "longest"),
    ],
)
def test_matches_open_clip_transform(open_clip, images, size, resize_mode, interpolation) -> None:
    reference = _reference(open_clip, size, resize_mode, fill_color=37, interpolation=interpolation)
    ours = Preprocessor(_config(size, resize_mode, fill_color=37, interpolation=interpolation))
    for case, image in images:
        got = ours(image)
        assert got.shape == (3, *size)
        np.testing.assert_array_equal(got, reference(image).numpy(), err_msg=str(case))


def test_non_square_shortest_resizes_bicubic_whatever_the_config() -> None:
    # open_clip's ResizeKeepRatio(image_size) takes no interpolation: always bicubic there
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 256, (70, 50, 3), dtype=np.uint8))
    bilinear = Preprocessor(_config((96, 128), "shortest", interpolation="bilinear"))
    bicubic = Preprocessor(_config((96, 128), "shortest", interpolation="bicubic"))
    assert bilinear.resample == Image.Resampling.BICUBIC
    np.testing.assert_array_equal(bilinear(image), bicubic(image))
    square = Preprocessor(_config((64, 64), "shortest", interpolation="bilinear"))
    assert square.resample == Image.Resampling.BILINEAR
    longest = Preprocessor(_config((96, 128), "longest", interpolation="bilinear"))
    assert longest.resample == Image.Resampling.BILINEAR


def test_sixteen_bit_is_scaled_not_clipped(open_clip) -> None:
    rng = np.random.default_rng(2)
    values = rng.integers(0, 65536, (70, 90), dtype=np.uint16)
    eight = ((values.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    ours = Preprocessor(_config((64, 64)))
    expected = _reference(open_clip, (64, 64))(Image.fromarray(eight, "L")).numpy()
    for image in (Image.fromarray(values), Image.fromarray(values.astype(np.int32), "I")):
        assert image.mode in ("I;16", "I")
        np.testing.assert_array_equal(ours(image), expected)
    # PIL's own convert would clip at 255 (an almost white image); ours keeps the range
    assert np.asarray(to_8bit(Image.fromarray(values))).mean() == pytest.approx(eight.mean())


def test_sixteen_bit_png_file(tmp_path: Path) -> None:
    values = np.linspace(0, 65535, 40 * 50).reshape(40, 50).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    image = load_image(path)
    assert image.mode in ("I;16", "I")
    eight = np.asarray(to_8bit(image))
    assert eight.min() == 0 and eight.max() == 255


def test_bgr_frame_equals_rgb_image_path() -> None:
    rng = np.random.default_rng(3)
    ours = Preprocessor(_config((64, 64)))
    for height, width in [(480, 640), (64, 64), (37, 200)]:
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        np.testing.assert_array_equal(ours.from_bgr(bgr), ours(Image.fromarray(rgb)))


def test_bgr_frame_rejects_wrong_layout() -> None:
    ours = Preprocessor(_config((64, 64)))
    with pytest.raises(ValueError, match="BGR uint8"):
        ours.from_bgr(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="BGR uint8"):
        ours.from_bgr(np.zeros((10, 10, 3), np.float32))


def test_batch_stacks_inputs_of_every_kind(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    ours = Preprocessor(_config((32, 48)))
    rgb = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    items = [
        Image.fromarray(rgb),
        rgb[:, :, ::-1].copy(),
        tmp_path / "a.png",
        str(tmp_path / "a.png"),
    ]
    batch = ours.batch(items)
    assert batch.shape == (4, 3, 32, 48) and batch.dtype == np.float32
    for row in batch[1:]:
        np.testing.assert_array_equal(row, batch[0])


def test_normalisation_values() -> None:
    ours = Preprocessor(_config((8, 8)))
    white = ours(Image.new("RGB", (8, 8), (255, 255, 255)))
    expected = (1.0 - np.asarray(MEAN)) / np.asarray(STD)
    np.testing.assert_allclose(white[:, 0, 0], expected, rtol=1e-6)


def test_unreadable_files_raise_image_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image at all" * 10)
    buffer = io.BytesIO()
    Image.new("RGB", (200, 200), (10, 200, 30)).save(buffer, "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    ours = Preprocessor(_config((32, 32)))
    for path, reason in [
        (empty, "empty"),
        (garbage, "not an image"),
        (truncated, "truncated"),
        (tmp_path / "missing.jpg", "not found"),
    ]:
        with pytest.raises(ImageError, match=reason):
            ours.from_path(path)
    assert issubclass(ImageError, UserError)


def test_bad_config_is_a_bundle_error() -> None:
    from vlm_export.core.errors import BundleError

    with pytest.raises(BundleError, match="resize_mode"):
        Preprocessor(_config((8, 8), resize_mode="zoom"))
    with pytest.raises(BundleError, match="malformed"):
        Preprocessor({"size": [8, 8]})


def test_mode_i_with_8bit_values_matches_open_clip(open_clip) -> None:
    # a 32-bit integer image holding 8-bit values: open_clip's transform is the reference
    rng = np.random.default_rng(5)
    values = rng.integers(0, 256, (70, 90)).astype(np.int32)
    image = Image.fromarray(values, "I")
    assert image.mode == "I"
    expected = _reference(open_clip, (64, 64))(image).numpy()
    np.testing.assert_array_equal(Preprocessor(_config((64, 64)))(image), expected)
    assert np.asarray(to_8bit(image).convert("L")).mean() == pytest.approx(values.mean())


def test_mode_i_value_range_decides_the_scale() -> None:
    def literal(values: np.ndarray, top: int) -> np.ndarray:
        clipped = np.clip(values.astype(np.float64), 0, top)
        return np.floor(clipped * 255 / top + 0.5).astype(np.uint8)

    rng = np.random.default_rng(6)
    for top, high in ((255, 256), (65535, 65536), (2**31 - 1, 2**31 - 1)):
        values = rng.integers(-5, high, (20, 30)).astype(np.int32)
        values[0, 0] = high - 1  # the peak decides the range
        got = np.asarray(to_8bit(Image.fromarray(values, "I")).convert("L"))
        np.testing.assert_array_equal(got, literal(values, top))


def test_concurrent_loads_never_leave_pils_bomb_cap_lifted(tmp_path) -> None:
    """load_image lifts PIL's process-wide decompression-bomb cap to check sizes itself: threads
    loading at once (a service's capture threads and uploads) must leave it as it was."""
    import threading

    from vlm_export.runtime.io.preprocess import load_image

    cap = Image.MAX_IMAGE_PIXELS
    paths = []
    for index in range(4):
        path = tmp_path / f"img{index}.png"
        Image.new("RGB", (40 + index, 30), (index, 0, 0)).save(path)
        paths.append(path)

    def work(path) -> None:
        for _ in range(200):
            load_image(path).close()

    threads = [threading.Thread(target=work, args=(p,)) for p in paths]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cap == Image.MAX_IMAGE_PIXELS
