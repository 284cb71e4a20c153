"""Regenerate ``fake_tca.fp32.tflite``: fakebundle's condensing graph as a LiteRT graph.

fakebundle's graph is hand-written ONNX (no PyTorch tower to give to litert-torch), so this
script converts it with onnx2tf, which converts that small graph exactly, then checks it against
ONNX Runtime with build-litert's parity gate. Run in a virtual environment with onnx2tf
(``pip install onnx2tf tensorflow tf_keras onnx-graphsurgeon sng4onnx onnxsim "numpy<2"``; made
with onnx2tf 1.29.24, tensorflow 2.21.0), from the repository root::

    python tests/data/make_litert_fixture.py

tests/test_litert.py adds the file to a fresh fake bundle to test the litert backend without a
converter.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # fakebundle

from fakebundle import live_fate_encoder, make_bundle  # noqa: E402

from vlm_export.core.manifest import read_manifest  # noqa: E402
from vlm_export.export.litert.build import parity_report  # noqa: E402

#: onnx2tf: keep every input's NCHW shape, write a signature with the ONNX names, Erf as builtins
ONNX2TF_FLAGS = ["-kat", "image", "anchors", "anchors_valid", "-coion", "-osd", "-rtpo", "Erf"]


def main() -> None:
    """Convert the fake bundle's graph, check it, and keep its .tflite as the test fixture."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = live_fate_encoder(make_bundle(Path(tmp) / "bundle", method="tca", reference=True))
        manifest = read_manifest(folder)
        onnx_path = folder / manifest["engine"]["onnx"]
        out = Path(tmp) / "converted"
        command = [sys.executable, "-m", "onnx2tf", "-i", str(onnx_path), "-o", str(out)]
        subprocess.run([*command, *ONNX2TF_FLAGS, "-n"], check=True)
        converted = out / f"{onnx_path.stem}_float32.tflite"
        report = parity_report(folder, manifest, converted)  # raises when it differs
        target = HERE / "fake_tca.fp32.tflite"
        shutil.copyfile(converted, target)
        print(f"wrote {target.name}: {target.stat().st_size} bytes, {report['operators']}")


if __name__ == "__main__":
    main()
