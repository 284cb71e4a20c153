"""One pipeline shared by threads (a camera callback and a UI thread, say): each call gets the
answer for its own image and its own ``topk``, a close waits for the call in progress, and the
arguments of the face are checked as one UserError each."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from fakebundle import make_bundle

from vlm_export.core.errors import UserError
from vlm_export.runtime import open_pipeline


@pytest.fixture(scope="module")
def zeroshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("threads") / "bundle", method="zeroshot")


def _frames() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(4)]


def _run_together(work, count: int) -> None:
    start = threading.Barrier(count)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        start.wait()
        try:
            work(index)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def test_threads_sharing_a_pipeline_get_their_own_answers(zeroshot_dir) -> None:
    frames = _frames()
    with open_pipeline(zeroshot_dir) as pipeline:
        alone = [
            pipeline.classify(frame, channels="RGB", topk=1 + i) for i, frame in enumerate(frames)
        ]
        embedded = [pipeline.embed(frame, channels="RGB") for frame in frames]
        mismatches: list[str] = []

        def work(index: int) -> None:
            frame = frames[index]
            for _ in range(40):
                result = pipeline.classify(frame, channels="RGB", topk=1 + index)
                if (
                    len(result.topk) != 1 + index
                    or result.scores.tolist() != alone[index].scores.tolist()
                ):
                    mismatches.append(f"classify {index}")
                if not np.array_equal(pipeline.embed(frame, channels="RGB"), embedded[index]):
                    mismatches.append(f"embed {index}")

        _run_together(work, len(frames))
    assert mismatches == []


def _close_during_calls(bundle: Path, frame: np.ndarray) -> list[str]:
    """One thread classifies 20 frames while another closes the pipeline: what the first saw."""
    pipeline = open_pipeline(bundle)
    outcomes: list[str] = []

    def work(index: int) -> None:
        if index == 1:
            pipeline.close()
            return
        try:
            for _ in range(20):
                pipeline.classify(frame, channels="RGB")
            outcomes.append("done")
        except UserError as exc:
            outcomes.append(str(exc))

    _run_together(work, 2)
    return outcomes


def test_close_in_another_thread_waits_for_the_call_in_progress(zeroshot_dir) -> None:
    """Never an engine error from a session closed under a running call: the call finishes,
    and the next one is refused as after any close."""
    closed = ["the pipeline is closed (its with block ended): open it again"]
    for _ in range(10):
        assert _close_during_calls(zeroshot_dir, _frames()[0]) in (["done"], closed)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"threads": "4"}, "threads must be a whole number, got str"),
        ({"threads": 2.5}, "threads must be a whole number, got float"),
        ({"threads": -1}, "threads must be 0 (the default) or more"),
        ({"state": 3}, "state must be a path"),
        ({"examples": 3}, "examples must be a path"),
        ({"rail_state": b"x.npz"}, "rail_state must be a path"),
        ({"method": ["tca"]}, "method must be a string"),
        (
            {"providers": "CPUExecutionProvider"},
            "providers must be a list of ONNX Runtime provider",
        ),
        ({"providers": [5]}, "providers must be a list of ONNX Runtime provider"),
    ],
)
def test_wrong_typed_options_are_one_user_error(zeroshot_dir, options, message) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        open_pipeline(zeroshot_dir, **options)


def test_numpy_numbers_and_a_capped_thread_count_are_taken(zeroshot_dir, caplog) -> None:
    frame = _frames()[0]
    with caplog.at_level(logging.WARNING):
        pipeline = open_pipeline(zeroshot_dir, threads=10**9, min_score=np.float32(0.0))
    assert "threads 1000000000 is more than the" in caplog.text
    with pipeline:
        assert len(pipeline.classify(frame, channels="RGB", topk=np.int64(3)).topk) == 3
        with pytest.raises(UserError, match="topk must be at least 1"):
            pipeline.classify(frame, channels="RGB", topk=True)
        with pytest.raises(UserError, match="save_state|path must be a path"):
            pipeline.save_state(5)


def test_channels_for_a_pil_image_or_a_file_is_refused(zeroshot_dir, tmp_path) -> None:
    from PIL import Image

    image = Image.fromarray(_frames()[0])
    image.save(tmp_path / "frame.png")
    with open_pipeline(zeroshot_dir) as pipeline:
        for given in (image, tmp_path / "frame.png"):
            with pytest.raises(UserError, match="channels='BGR' applies to numpy arrays"):
                pipeline.classify(given, channels="BGR")
        assert (
            pipeline.classify(image).class_name
            == pipeline.classify(tmp_path / "frame.png").class_name
        )
