"""Regenerate ``fake_tca.fp32.tflite``: fakebundle's condensing graph converted by build-litert.

Run where the converter is installed (``pip install ".[litert-export]" "numpy<2"``), from the
repository root::

    python tests/data/make_litert_fixture.py

It converts the graph of ``live_fate_encoder(make_bundle(method="tca"))`` with build-litert
(checked against ONNX Runtime there) and copies the ``.tflite`` next to this script.
tests/test_litert.py adds it to a fresh fake bundle to test the litert backend without the
converter.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # fakebundle

from fakebundle import live_fate_encoder, make_bundle  # noqa: E402

from vlm_export.export.litert_build import add_litert_to_bundle  # noqa: E402
from vlm_export.export.progress import Progress  # noqa: E402


def main() -> None:
    """Convert the fake bundle's graph and keep its .tflite as the test fixture."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = live_fate_encoder(make_bundle(Path(tmp) / "bundle", method="tca", reference=True))
        record = add_litert_to_bundle(folder, progress=Progress(2))
        target = HERE / "fake_tca.fp32.tflite"
        shutil.copyfile(folder / record["file"], target)
        print(f"wrote {target.name}: {target.stat().st_size} bytes, {record['operators']}")


if __name__ == "__main__":
    main()
