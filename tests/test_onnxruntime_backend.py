"""ONNX Runtime backend: the graph must match the manifest; onnxruntime imported only when used."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fakebundle import make_bundle, write_images

from vlm_export.core import manifest as mf
from vlm_export.core.errors import BundleError, UserError
from vlm_export.runtime import cli
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.engines.backends import onnxruntime_backend as ortb
from vlm_export.runtime.engines.factory import open_backend


@pytest.fixture(scope="module")
def tca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("tca") / "bundle", method="tca")


def _with_onnx_of(bundle_dir: Path, other_dir: Path, folder: Path) -> Path:
    """A copy of ``bundle_dir`` whose (re-hashed) ONNX file comes from ``other_dir``."""
    folder = Path(shutil.copytree(bundle_dir, folder))
    shutil.copyfile(other_dir / mf.IMAGE_ENCODER_ONNX, folder / mf.IMAGE_ENCODER_ONNX)
    path = folder / mf.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["files"][mf.IMAGE_ENCODER_ONNX] = mf.file_record(folder / mf.IMAGE_ENCODER_ONNX)
    path.write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize(
    ("other", "message"),
    [
        ({"image_size": 16}, "input 'image' has shape [1, 3, 16, 16], the manifest says [1, 3, 32"),
        ({"width": 12}, "input 'anchors' has shape [6, 2, 12], the manifest says [6, 2, 16]"),
        ({"embed": 4}, "output 'embedding' has shape [1, 4], the manifest says [1, 8]"),
        ({"method": "zeroshot"}, "ONNX inputs ['image'] differ from the manifest's"),
    ],
)
def test_graph_that_does_not_fit_the_manifest(tca_dir, tmp_path, other, message) -> None:
    other_dir = make_bundle(tmp_path / "other", **{"method": "tca", **other})
    bundle = Bundle.open(_with_onnx_of(tca_dir, other_dir, tmp_path / "mixed"))
    with pytest.raises(BundleError) as caught:
        ortb.OnnxRuntimeBackend(bundle, threads=1)
    assert message in str(caught.value)


def test_check_tensor_dtype_and_symbolic_dims() -> None:
    record = {"name": mf.IMAGE_INPUT, "shape": [1, 3, 32, 32], "dtype": "float32"}
    ortb.check_tensor("input", mf.IMAGE_INPUT, ["batch", 3, 32, 32], "tensor(float)", record)
    ortb.check_tensor("input", mf.IMAGE_INPUT, [None, 3, 32, 32], "tensor(float)", record)
    with pytest.raises(BundleError, match=r"has shape \['\?', 3, 32\], the manifest says"):
        ortb.check_tensor("input", mf.IMAGE_INPUT, [None, 3, 32], "tensor(float)", record)
    with pytest.raises(
        BundleError, match=r"'image' is tensor\(float16\), the manifest says float32"
    ):
        ortb.check_tensor("input", mf.IMAGE_INPUT, [1, 3, 32, 32], "tensor(float16)", record)


def test_missing_onnxruntime_is_a_user_error(tca_dir, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    bundle = Bundle.open(tca_dir)
    for backend in ("onnxruntime", "auto"):
        with pytest.raises(ortb.OnnxRuntimeMissing) as caught:
            open_backend(bundle, backend)
        assert str(caught.value) == (
            'ONNX Runtime is not installed: pip install ".[cpu]" (or [gpu] on NVIDIA GPUs)'
        )
    assert issubclass(ortb.OnnxRuntimeMissing, UserError)


def test_cli_without_onnxruntime_prints_one_line(tca_dir, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    image = write_images(tmp_path, 1)[0]
    assert cli.main(["run", str(tca_dir), str(image), "--out", str(tmp_path / "o.jsonl")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        'vlm-edge: error: ONNX Runtime is not installed: pip install ".[cpu]" '
        "(or [gpu] on NVIDIA GPUs)"
    )


def test_backend_module_imports_without_onnxruntime() -> None:
    child = textwrap.dedent(
        """
        import sys
        sys.modules["onnxruntime"] = None
        from vlm_export.runtime.engines import factory
        from vlm_export.runtime.engines.backends import onnxruntime_backend
        print(onnxruntime_backend.choose_providers(["cpu"], ["CPUExecutionProvider"]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['CPUExecutionProvider']"


def test_both_distributions_warn_once(monkeypatch, caplog) -> None:
    monkeypatch.setattr(ortb, "_conflict_checked", False)
    monkeypatch.setattr(ortb, "installed_distribution", lambda name: True)
    with caplog.at_level(logging.WARNING, logger="vlm_export"):
        ortb.import_onnxruntime()
        ortb.import_onnxruntime()  # once per process
    [record] = caplog.records
    assert "both onnxruntime and onnxruntime-gpu" in record.getMessage()


def test_one_distribution_does_not_warn(monkeypatch, caplog) -> None:
    monkeypatch.setattr(ortb, "_conflict_checked", False)
    monkeypatch.setattr(ortb, "installed_distribution", lambda name: name == "onnxruntime-gpu")
    with caplog.at_level(logging.WARNING, logger="vlm_export"):
        assert ortb.import_onnxruntime().__name__ == "onnxruntime"
    assert not caplog.records


def test_installed_distribution_reads_metadata() -> None:
    assert ortb.installed_distribution("numpy")
    assert not ortb.installed_distribution("vlm-export-no-such-distribution")
