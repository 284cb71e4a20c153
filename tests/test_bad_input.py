"""Hostile input corpus: bundles, manifests, companion files, state files, images, folders and
command-line values, each run through ``vlm-edge`` (info, run) or ``vlm-export``.

Every case must end with one clear line (exit status 1 or 2, or an error record for one frame),
never a traceback, and must leave the bundle and state files exactly as they were. The cases run
in-process through the command-line entry points: an exception escaping ``main`` is what the user
would see as a traceback, and is counted as one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fakebundle import make_bundle, write_images
from PIL import Image

from vlm_export.core import manifest as mf
from vlm_export.core.json_input import nesting_depth
from vlm_export.core.manifest_schema import manifest_schema
from vlm_export.runtime import cli, open_pipeline
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.tca.stage import build_reservoir

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers
def _snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every regular file under ``roots`` (links, FIFOs and loops left alone)."""
    digest = {}
    for root in roots:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            if not path.is_symlink():
                digest[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def _edge(argv: list[str], capsys) -> tuple[int, list[str], str]:
    """Run vlm-edge in-process: (exit status, stderr lines, stdout); a traceback fails the test."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code if isinstance(exc.code, int) else 2
    except BaseException as exc:  # pragma: no cover - the failure this corpus looks for
        pytest.fail(f"traceback: {type(exc).__name__}: {exc}")
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    return code, lines, captured.out


def _error_line(lines: list[str]) -> str:
    errors = [line for line in lines if ": error:" in line]
    assert len(errors) == 1, lines
    return errors[0]


def _rehash(bundle: Path, name: str) -> None:
    """Record a replaced file's sha256 and size, as someone re-hashing a tampered bundle would."""
    path = bundle / mf.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["files"][name] = mf.file_record(bundle / name)
    path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bad") / "bundle")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_images(folder, 2)
    return folder


@pytest.fixture
def bundle(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "bundle"))


# ----------------------------------------------------------------------------- the schema
def test_schema_is_valid_and_documents_every_field() -> None:
    import jsonschema

    schema = manifest_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is True  # later sections may be added

    def walk(node: dict, where: str) -> None:
        for name, sub in node.get("properties", {}).items():
            assert "description" in sub, f"{where}.{name} has no description"
            walk(sub, f"{where}.{name}")
        for name, sub in node.get("$defs", {}).items():
            assert "description" in sub, f"$defs.{name} has no description"
            walk(sub, f"$defs.{name}")

    walk(schema, "manifest")
    assert set(schema["required"]) <= set(schema["properties"])


def test_a_valid_bundle_passes_the_schema(pristine: Path) -> None:
    mf.validate_manifest(json.loads((pristine / mf.MANIFEST_NAME).read_text()))


def test_nesting_depth_is_measured_outside_strings() -> None:
    assert nesting_depth('{"a": [1, {"b": "[[[[{{{{"}]}') == 3
    assert nesting_depth('["\\"[[[", []]') == 2
    assert nesting_depth("[" * 100_000 + "]" * 100_000) == 100_000


# ----------------------------------------------------------------------------- manifests
def _set(path: tuple, value: object) -> Callable[[dict], None]:
    def edit(manifest: dict) -> None:
        *parents, last = path
        node = manifest
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return edit


_DELETE = object()

MANIFEST_CASES = [
    (("text", "embeddings"), 5, "text.embeddings: expected a file name (string), got 5"),
    (("text", "embeddings"), None, "text.embeddings: expected a file name (string), got null"),
    (("text", "embeddings"), ["a.npy"], "text.embeddings: expected a file name (string), got a"),
    (("labels", "file"), {"x": 1}, "labels.file: expected a file name (string), got an object"),
    (("engine", "onnx"), "../x.onnx", "engine.onnx: expected a plain file name"),
    (("preprocess", "fill_color"), "black", "fill_color: expected an integer, got the string"),
    (("preprocess", "mean"), "red", "preprocess.mean: expected a list, got the string 'red'"),
    (("preprocess", "std"), [0, 1, 1], "preprocess.std[0]: expected a number > 0, got 0"),
    (("preprocess", "size"), [32], "preprocess.size: expected a list of exactly 2 items, got 1"),
    (("preprocess", "resize_mode"), "zoom", "resize_mode: expected one of 'shortest'"),
    (("preprocess", "size"), [10**5, 10**5], "expected a number <= 16384, got 100000"),
    (("model",), "ViT-B-16", "model: expected an object, got the string 'ViT-B-16'"),
    (("model", "untrained"), "no", "model.untrained: expected true or false"),
    (("engine",), "x", "engine: expected an object"),
    (("engine", "inputs", 0, "shape", 3), 32.5, "engine.inputs[0].shape[3]: expected an integer"),
    (("engine", "batch_size"), 10**30, None),  # huge but an integer: refused by the contract
    (("engines",), {}, "engines: expected a list, got an object"),
    (("files",), [], "files: expected an object, got a list"),
    (("files", mf.CLASSES_FILE, "sha256"), "abc", "sha256: expected lower-case hex sha256"),
    (("adaptation", "tca"), "imagenet", "adaptation.tca: expected an object"),
    (("adaptation", "tca", "capacity"), "3", "adaptation.tca.capacity: expected an integer"),
    (("adaptation", "tca", "capacity"), 0, "adaptation.tca.capacity: expected a number >= 1"),
    (("adaptation", "rail", "fusion_beta"), 2, "fusion_beta: expected a number <= 1, got 2"),
    (("condensation",), "x", "condensation: expected an object or null"),
    (("condensation",), None, "method tca needs a condensation section"),
    (("method",), "magic", "method: expected one of 'zeroshot'"),
    (("labels", "num_classes"), -1, "labels.num_classes: expected a number >= 1, got -1"),
    (("text",), _DELETE, "(top level): missing field 'text'"),
    (("schema_version",), "1", "schema_version: expected an integer"),
    (("format",), "zip", "not a vlm-export bundle"),
]


@pytest.mark.parametrize(("path", "value", "message"), MANIFEST_CASES)
def test_manifest_with_wrong_types_is_one_line(bundle, capsys, path, value, message) -> None:
    manifest_path = bundle / mf.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    _set(path, value)(manifest)
    manifest_path.write_text(json.dumps(manifest))
    before = _snapshot(bundle)
    code, lines, _ = _edge(["info", str(bundle)], capsys)
    assert code == 1
    line = _error_line(lines)
    if message:
        assert message in line
    assert _snapshot(bundle) == before


RAW_MANIFESTS = [
    ("deep", lambda: "[" * 100_000 + "]" * 100_000, "nested 100000 levels deep"),
    ("deep object", lambda: '{"a":' * 50_000 + "1" + "}" * 50_000, "levels deep"),
    ("NaN", None, "NaN is not a JSON number"),
    ("empty", lambda: "", "is not valid JSON"),
    ("not UTF-8", lambda: b'{"format": "\xff\xfe"}', "is not UTF-8 text"),
    ("huge", lambda: " " * (mf.MAX_MANIFEST_BYTES + 1), "larger than"),
    ("a list", lambda: "[1, 2]", "expected a JSON object, got a list"),
    ("a string", lambda: '"bundle"', "expected a JSON object, got the string"),
]


@pytest.mark.parametrize(
    ("name", "content", "message"), RAW_MANIFESTS, ids=[c[0] for c in RAW_MANIFESTS]
)
def test_unparseable_manifest_is_one_line(bundle, capsys, name, content, message) -> None:
    path = bundle / mf.MANIFEST_NAME
    if content is None:  # a NaN where a number goes (Python's parser would accept it)
        text = path.read_text().replace('"cosine_min": 1.0', '"cosine_min": NaN')
        assert "NaN" in text
    else:
        text = content()
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = _snapshot(bundle)
    code, lines, _ = _edge(["info", str(bundle)], capsys)
    assert code == 1 and message in _error_line(lines)
    assert _snapshot(bundle) == before


def test_manifest_that_is_a_fifo_is_never_opened(bundle, capsys) -> None:
    path = bundle / mf.MANIFEST_NAME
    path.unlink()
    os.mkfifo(path)
    code, lines, _ = _edge(["info", str(bundle)], capsys)
    assert code == 1 and "manifest.json" in _error_line(lines)


# ----------------------------------------------------------------------------- companion files
def _npz_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros((6, 8), np.float32))
    return buffer.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _text(values: float) -> bytes:
    array = np.ones((6, 8), np.float32) / np.sqrt(8)
    array[2, 3] = values
    return _npy_bytes(array)


COMPANION_CASES = [
    ("npz under npy", mf.TEXT_EMBEDDINGS, _npz_bytes, ".npz archive saved under a .npy name"),
    ("NaN rows", mf.TEXT_EMBEDDINGS, lambda: _text(np.nan), "holds NaN values"),
    ("inf rows", mf.TEXT_EMBEDDINGS, lambda: _text(np.inf), "holds infinite values"),
    ("int dtype", mf.TEXT_EMBEDDINGS, lambda: _npy_bytes(np.ones((6, 8), np.int32)), "dtype int32"),
    ("shape", mf.TEXT_EMBEDDINGS, lambda: _npy_bytes(np.ones((5, 8), np.float32)), "shape [5, 8]"),
    ("huge shape", mf.TEXT_EMBEDDINGS, None, "shape [6000000000, 8]"),
    ("garbage", mf.TEXT_EMBEDDINGS, lambda: b"hello world", "not a .npy array"),
    (
        "truncated",
        mf.TEXT_EMBEDDINGS,
        lambda: _text(0.0)[:-5],
        "bytes of data, its header declares",
    ),
    ("header", mf.TEXT_EMBEDDINGS, lambda: b"\x93NUMPY\x01\x00\x10\x00{'descr': 1", "corrupt .npy"),
    ("empty npy", mf.TEXT_EMBEDDINGS, lambda: b"", "not a .npy array"),
    ("empty onnx", mf.IMAGE_ENCODER_ONNX, lambda: b"", "is empty (0 bytes)"),
    ("classes list", mf.CLASSES_FILE, lambda: b"[1, 2]", "expected a JSON object, got a list"),
    ("classes name", mf.CLASSES_FILE, None, "classes[0].name: expected a string, got 7"),
    ("classes deep", mf.CLASSES_FILE, lambda: b"[" * 100_000, "levels deep"),
    ("classes bytes", mf.CLASSES_FILE, lambda: b"\xff\xfe\x00", "not UTF-8"),
]


def _npy_header(shape: str) -> bytes:
    """A float32 .npy header declaring ``shape`` followed by a few bytes of data."""
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}"
    header += " " * (63 - (len(header) + 10) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 64


def _huge_header() -> bytes:
    return _npy_header("(6000000000, 8)")


def _bad_class_name(bundle: Path) -> bytes:
    data = json.loads((bundle / mf.CLASSES_FILE).read_text())
    data["classes"][0]["name"] = 7
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("case", "name", "content", "message"), COMPANION_CASES, ids=[c[0] for c in COMPANION_CASES]
)
def test_rehashed_companion_file_is_one_line(bundle, capsys, case, name, content, message) -> None:
    if case == "huge shape":
        data = _huge_header()
    elif case == "classes name":
        data = _bad_class_name(bundle)
    else:
        data = content()
    (bundle / name).write_bytes(data)
    _rehash(bundle, name)  # the sha256 matches: only the content checks can tell
    before = _snapshot(bundle)
    code, lines, _ = _edge(["info", str(bundle)], capsys)
    assert code == 1 and message in _error_line(lines)
    assert _snapshot(bundle) == before


def test_embeddings_declaring_more_rows_than_they_hold_are_refused(bundle, capsys) -> None:
    # header and manifest agree on 6e9 rows (190 GB): refused from the file size, not allocated
    (bundle / mf.TEXT_EMBEDDINGS).write_bytes(_huge_header())
    _rehash(bundle, mf.TEXT_EMBEDDINGS)
    path = bundle / mf.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["text"]["shape"] = [6_000_000_000, 8]
    manifest["labels"]["num_classes"] = 6_000_000_000
    manifest["engine"]["inputs"][1]["shape"][0] = 6_000_000_000
    manifest["engine"]["inputs"][2]["shape"][0] = 6_000_000_000
    path.write_text(json.dumps(manifest))
    code, lines, _ = _edge(["info", str(bundle)], capsys)
    assert code == 1 and "its header declares 192000000000" in _error_line(lines)


@pytest.mark.parametrize("content", [b"not an onnx model", bytes(range(256)) * 4])
def test_rehashed_non_onnx_model_fails_run_in_one_line(bundle, images, capsys, content) -> None:
    (bundle / mf.IMAGE_ENCODER_ONNX).write_bytes(content)
    _rehash(bundle, mf.IMAGE_ENCODER_ONNX)
    before = _snapshot(bundle, images)
    code, lines, _ = _edge(["run", str(bundle), str(images), "--quiet"], capsys)
    assert code == 1 and "ONNX Runtime cannot load image_encoder.onnx" in _error_line(lines)
    assert _snapshot(bundle, images) == before


# ----------------------------------------------------------------------------- state files
@pytest.fixture(scope="module")
def saved_state(pristine, images, tmp_path_factory) -> Path:
    state = tmp_path_factory.mktemp("state") / "tca.npz"
    assert cli.main(["run", str(pristine), str(images), "--state", str(state), "--quiet"]) == 0
    return state


def _rewrite_state(source: Path, target: Path, change: Callable[[dict, dict], None]) -> None:
    with np.load(source, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    meta = json.loads(str(arrays.pop("__meta__")))
    change(arrays, meta)
    np.savez(target, __meta__=np.array(json.dumps(meta)), **arrays)


def _nan_units(arrays: dict, meta: dict) -> None:
    arrays["unit_stacks"] = arrays["unit_stacks"].copy()
    arrays["unit_stacks"][0, 0, 0, 0] = np.nan


def _inf_entropies(arrays: dict, meta: dict) -> None:
    arrays["entropies"] = arrays["entropies"].copy()
    arrays["entropies"][1, 0] = np.inf


def _huge_capacity(arrays: dict, meta: dict) -> None:
    meta["config"]["capacity"] = 10**9


def _config_string(arrays: dict, meta: dict) -> None:
    meta["config"] = "imagenet"


def _layers_string(arrays: dict, meta: dict) -> None:
    meta["num_layers"] = "4"


def _counts_float(arrays: dict, meta: dict) -> None:
    arrays["counts"] = arrays["counts"].astype(np.float64)


STATE_CASES = [
    ("NaN units", _nan_units, "'unit_stacks' holds NaN values"),
    ("inf entropies", _inf_entropies, "'entropies' holds infinite values"),
    ("capacity 1e9", _huge_capacity, "is declared [6, 3, 4, 16], expected [6, 1000000000, 4, 16]"),
    ("config string", _config_string, "unusable reservoir config"),
    ("layers string", _layers_string, "num_layers=4, not 4"),
    ("float counts", _counts_float, "counts must be integers"),
]


@pytest.mark.parametrize(
    ("case", "change", "message"), STATE_CASES, ids=[c[0] for c in STATE_CASES]
)
def test_bad_state_is_refused_at_load(
    pristine, images, saved_state, tmp_path, capsys, case, change, message
) -> None:
    state = tmp_path / "state.npz"
    _rewrite_state(saved_state, state, change)
    before = _snapshot(pristine, images, state)
    code, lines, _ = _edge(["run", str(pristine), str(images), "--state", str(state)], capsys)
    line = _error_line(lines)
    assert code == 1 and message in line and str(state) in line
    assert _snapshot(pristine, images, state) == before


def _state_with_declared_shape(source: Path, target: Path) -> None:
    """A state whose unit_stacks header declares 6 x 10^9 x 4 x 16 floats (1.5 TB), data tiny."""
    import zipfile

    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        for item in archive.infolist():
            data = archive.read(item)
            if item.filename == "unit_stacks.npy":
                data = _npy_header("(6, 1000000000, 4, 16)")
            out.writestr(item, data)


RAW_STATES = [
    ("npy", lambda s, t: t.write_bytes(_npy_bytes(np.zeros(3))), "a single .npy array"),
    ("garbage", lambda s, t: t.write_bytes(b"PK\x03\x04garbage"), "not a readable state file"),
    ("empty", lambda s, t: t.write_bytes(b""), "not a readable state file"),
    ("meta int", lambda s, t: np.savez(t, __meta__=np.array(5)), "corrupt header"),
    ("meta deep", lambda s, t: np.savez(t, __meta__=np.array("[" * 100_000)), "levels deep"),
    ("meta list", lambda s, t: np.savez(t, __meta__=np.array("[1]")), "not a JSON object"),
    (
        "object array",
        lambda s, t: np.savez(t, __meta__=np.array("{}"), x=np.array([{}], dtype=object)),
        "dtype object",
    ),
    ("declared 1.5 TB", _state_with_declared_shape, "is declared [6, 1000000000, 4, 16]"),
]


@pytest.mark.parametrize(("case", "write", "message"), RAW_STATES, ids=[c[0] for c in RAW_STATES])
def test_unreadable_state_is_one_line(
    pristine, images, saved_state, tmp_path, capsys, case, write, message
) -> None:
    state = tmp_path / "state.npz"
    write(saved_state, state)
    before = _snapshot(pristine, images, state)
    code, lines, _ = _edge(["run", str(pristine), str(images), "--state", str(state)], capsys)
    assert code == 1 and message in _error_line(lines)
    assert _snapshot(pristine, images, state) == before


# ----------------------------------------------------------------------------- sizes and values
def test_reservoir_capacity_above_memory_names_one_that_fits(pristine, images, capsys) -> None:
    code, lines, _ = _edge(
        ["run", str(pristine), str(images), "--capacity", str(10**12), "--quiet"], capsys
    )
    line = _error_line(lines)
    assert code == 1 and "TCA reservoir needs" in line and "available; --capacity" in line
    fits = int(line.split("--capacity ")[1].split()[0])
    assert 1 <= fits < 10**12


ARGUMENT_CASES = [
    (["--capacity", "0"], "capacity must be an integer >= 1"),
    (["--tau", "nan"], "tau must be a finite number"),
    (["--lam=-inf"], "lam must be a finite number"),
    (["--max-pixels", "-1"], "--max-pixels: expected a whole number >= 0"),
    (["--max-pixels", "lots"], "--max-pixels: expected a whole number >= 0"),
]


@pytest.mark.parametrize(("extra", "message"), ARGUMENT_CASES)
def test_bad_values_are_one_line(pristine, images, capsys, extra, message) -> None:
    code, lines, _ = _edge(["run", str(pristine), str(images), "--quiet", *extra], capsys)
    assert code in (1, 2) and message in _error_line(lines)  # after argparse's usage lines


# ----------------------------------------------------------------------------- images and folders
def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header says width x height (one tiny compressed row follows)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (1 + 3 * min(width, 64)))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def _records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_image_above_pixel_limit_is_an_error_record(pristine, tmp_path, capsys) -> None:
    folder = tmp_path / "frames"
    write_images(folder, 1)
    _png_header_only(folder / "huge.png", 13_000, 13_000)  # 169 megapixels, a few hundred bytes
    before = _snapshot(folder)
    code, _, out = _edge(["run", str(pristine), str(folder), "--quiet"], capsys)
    records = _records(out)
    assert code == 0 and len(records) == 2
    huge = next(r for r in records if r["source"].endswith("huge.png"))
    assert "169.0 megapixels" in huge["error"] and "--max-pixels" in huge["error"]
    code, _, out = _edge(
        ["run", str(pristine), str(folder), "--quiet", "--max-pixels", "100"], capsys
    )
    assert all("error" in r for r in _records(out))  # a 100-pixel limit refuses both
    assert _snapshot(folder) == before


def test_folder_with_links_loops_and_fifos_never_hangs(pristine, tmp_path, capsys) -> None:
    folder = tmp_path / "frames"
    write_images(folder, 2)
    (folder / "dangling.jpg").symlink_to(folder / "gone.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    os.mkfifo(folder / "pipe.jpg")  # opening it for reading would block forever
    (folder / "up").symlink_to(folder)
    (folder / "self").symlink_to(".")
    code, _, out = _edge(["run", str(pristine), str(folder), "--quiet"], capsys)
    errors = {Path(r["source"]).name: r["error"] for r in _records(out) if "error" in r}
    assert code == 0
    assert "dangling symbolic link" in errors["dangling.jpg"]
    assert "symbolic link loop" in errors["loop.jpg"]
    assert "a FIFO, not a regular file" in errors["pipe.jpg"]
    # a recursive glob through two link loops classifies each real file once
    code, lines, out = _edge(["run", str(pristine), f"{folder}/**/*.jpg"], capsys)
    sources = [Path(r["source"]).name for r in _records(out)]
    assert code == 0 and sorted(sources) == sorted(
        ["img_0000.jpg", "img_0001.jpg", "dangling.jpg", "loop.jpg", "pipe.jpg"]
    )


def test_mode_i_image_with_8bit_values_is_not_dark(pristine, tmp_path, capsys) -> None:
    path = tmp_path / "int.tif"
    Image.fromarray(np.full((40, 40), 200, np.int32), "I").save(path)
    code, _, out = _edge(["run", str(pristine), str(path), "--quiet"], capsys)
    assert code == 0 and "error" not in _records(out)[0]


# ----------------------------------------------------------------------------- vlm-export
_EXPORT_PROBE = """
import json, sys
from vlm_export.export.cli import main
codes = [main(argv) for argv in json.loads(sys.argv[1])]
print(json.dumps({"codes": codes, "torch": "torch" in sys.modules}))
"""


@pytest.mark.exporter
def test_export_argument_errors_come_before_torch(tmp_path: Path) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    exists = tmp_path / "exists"
    exists.mkdir()
    out = str(tmp_path / "out")
    cases = [
        ["--out", out],
        ["--classes", str(empty), "--out", out],
        ["--classes", str(classes), "--out", str(exists)],
        ["--classes", str(classes), "--model", "ViT-B-17", "--out", out],
        ["--classes", str(classes), "--templates", "nosuch", "--out", out],
        ["--classes", str(classes), "--templates", str(classes), "--out", out],
        ["--classes", str(classes), "--tca-preset", "nosuch", "--out", out],
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", _EXPORT_PROBE, json.dumps(cases)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    report = json.loads(result.stdout)
    assert report == {"codes": [2] * len(cases), "torch": False}
    lines = result.stderr.strip().splitlines()
    assert len(lines) == len(cases) and "Traceback" not in result.stderr
    assert "no classes given" in lines[0] and "holds no class names" in lines[1]
    assert "exists" in lines[2] and "did you mean ViT-B-16" in lines[3]
    assert "unknown template set" in lines[4] and "exactly one {}" in lines[5]
    assert not (tmp_path / "out").exists()


@pytest.mark.exporter
def test_pretrained_tag_without_network_names_the_file(tmp_path: Path) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HOME": str(tmp_path / "hf"),  # an empty cache
        "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens there: no network
    }
    env.pop("HF_HUB_OFFLINE", None)
    argv = ["--model", "ViT-B-16", "--pretrained", "openai", "--classes", str(classes)]
    child = (
        "import sys; from vlm_export.export.cli import main; code = main(sys.argv[1:]); "
        "print('torch' in sys.modules); sys.exit(code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", child, *argv, "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stdout.strip() == "False"  # refused before torch was imported (seconds)
    line = result.stderr.strip().splitlines()[-1]
    assert "timm/vit_base_patch16_clip_224.openai" in line and "open_clip_pytorch_model.bin" in line
    assert "--pretrained path/to/" in line and "HF_HUB_OFFLINE=1" in line
    assert "--pretrained-tag openai" in line  # the file alone does not say it is QuickGELU


def test_hostile_bundle_from_the_command_line_prints_no_traceback(bundle: Path) -> None:
    (bundle / mf.MANIFEST_NAME).write_text("[" * 100_000 + "]" * 100_000)
    result = subprocess.run(
        [sys.executable, "-m", "vlm_export.runtime", "info", str(bundle)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- bounded by content
# Memory follows what an input really holds (issue 18): image sides and aspect ratio from the
# header, class lists, JSON inputs and state files checked before they are read.
FORMATS = ["PNG", "JPEG", "GIF", "TIFF", "BMP", "WEBP"]


def _save_image(path: Path, size: tuple[int, int], fmt: str) -> Path:
    Image.new("L" if fmt == "GIF" else "RGB", size, 90).save(path, format=fmt)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("size", [(6400, 20), (20, 6400)], ids=["wide", "tall"])
def test_aspect_ratio_the_model_cannot_use_is_an_error_record(
    pristine, tmp_path, capsys, fmt, size
) -> None:
    path = _save_image(tmp_path / f"odd.{fmt.lower()}", size, fmt)
    code, _, out = _edge(["run", str(pristine), str(path), "--quiet"], capsys)
    (record,) = _records(out)
    assert code == 1 and "aspect ratio of 320:1" in record["error"], record
    assert "up to 256:1" in record["error"]


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "BMP"])  # JPEG, GIF and WebP cannot be this wide
def test_side_longer_than_the_limit_is_refused_before_decoding(
    pristine, tmp_path, capsys, fmt
) -> None:
    path = tmp_path / f"line.{fmt.lower()}"
    if fmt == "PNG":
        _png_header_only(path, 1, 100_000)  # the 1x100000 PNG of a few hundred bytes
    else:
        _save_image(path, (70_000, 1), fmt)
    code, _, out = _edge(["run", str(pristine), str(path), "--quiet"], capsys)
    (record,) = _records(out)
    assert code == 1 and "a side longer than 65535 pixels" in record["error"], record


def test_explain_and_the_api_apply_the_same_limits(pristine, tmp_path, capsys) -> None:
    from vlm_export.runtime.io.preprocess import ImageError

    line = tmp_path / "line.png"
    _png_header_only(line, 200_000, 1)
    photo = write_images(tmp_path / "photos", 1)[0]
    out = tmp_path / "pictures"
    for argv, words in (
        (["explain", str(pristine), str(line), "--out", str(out)], "side longer than 65535"),
        (["explain", str(pristine), str(photo), "--out", str(out), "--max-pixels", "100"],
         "above the limit of 0.0001"),
    ):  # fmt: skip
        code, lines, _ = _edge(argv, capsys)
        assert code == 1 and any(words in entry for entry in lines), lines
    assert not any(out.glob("*.png"))
    lazy = tmp_path / "lazy.png"
    _png_header_only(lazy, 13_000, 13_000)
    with open_pipeline(pristine) as pipeline:
        with pytest.raises(ImageError, match="side longer than 65535"):
            pipeline.classify(line)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(lazy)  # opened, never decoded
        with pytest.raises(ImageError, match="169.0 megapixels"):
            pipeline.classify(opened)
        with pytest.raises(ImageError, match="aspect ratio"):
            pipeline.classify(np.zeros((2, 1000), np.uint8))
        assert pipeline.classify(photo).class_name


def test_jpeg_above_the_pixel_limit_is_decoded_reduced(tmp_path) -> None:
    from vlm_export.runtime.io.preprocess import ImageError, load_image

    jpeg = _save_image(tmp_path / "big.jpg", (4000, 3000), "JPEG")
    png = _save_image(tmp_path / "big.png", (4000, 3000), "PNG")
    assert load_image(jpeg).size == (4000, 3000)  # within the limit: decoded in full
    assert load_image(jpeg, max_pixels=1_000_000).size == (1000, 750)  # libjpeg at 1/4
    with pytest.raises(ImageError, match="above the limit of 0.1"):
        load_image(jpeg, max_pixels=100_000)  # even 1/8 (500x375) is above it
    with pytest.raises(ImageError, match="above the limit of 1"):
        load_image(png, max_pixels=1_000_000)  # PNG cannot decode reduced


def test_deep_grayscale_is_converted_in_blocks_with_the_same_values() -> None:
    from vlm_export.runtime.io.preprocess import to_8bit

    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (700, 33), dtype=np.int64)  # rows span three blocks
    for mode, array in (("I;16", values.astype(np.uint16)), ("I", values.astype(np.int32) - 9)):
        image = Image.fromarray(array)
        assert image.mode == mode
        got = np.asarray(to_8bit(image))
        want = (np.clip(array.astype(np.int64), 0, 65535) * 255 + 32767) // 65535
        assert np.array_equal(got, want.astype(np.uint8)), mode


def _sparse(size: int) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with open(path, "wb") as handle:
            handle.truncate(size)

    return write


CLASS_LIST_CASES = [
    ("folder", "classes.txt", lambda p: p.mkdir(), "is a folder, not a file"),
    ("fifo", "classes.txt", os.mkfifo, "is a FIFO, not a regular file"),
    ("9 MiB", "classes.txt", _sparse(9 << 20), "is 9 MiB, more than a class list's 8 MiB"),
    ("100,001 names", "classes.txt",
     lambda p: p.write_text("".join(f"c{i}\n" for i in range(100_001))), "more than 100,000"),
    ("nested JSON", "classes.json", lambda p: p.write_text("[" * 100_000), "levels deep"),
    ("lone surrogate", "classes.json", lambda p: p.write_text('["\\ud800"]'), "lone surrogate"),
    ("JSON object", "classes.json", lambda p: p.write_text('{"a": 1}'), "JSON list of strings"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "name", "write", "message"), CLASS_LIST_CASES, ids=[c[0] for c in CLASS_LIST_CASES]
)
def test_class_list_is_checked_before_it_is_read(
    pristine, tmp_path, capsys, case, name, write, message
) -> None:
    path = tmp_path / name
    write(path)
    before = _snapshot(pristine)
    code, lines, _ = _edge(["classes", str(pristine), str(path), "--no-verify"], capsys)
    assert code == 1 and message in _error_line(lines)
    assert _snapshot(pristine) == before


def test_a_device_as_class_list_is_never_read(pristine, capsys) -> None:
    code, lines, _ = _edge(["classes", str(pristine), "/dev/zero", "--no-verify"], capsys)
    assert code == 1 and "is a device or socket, not a regular file" in _error_line(lines)


def test_run_classes_on_a_bundle_of_several_domains_says_what_to_do(
    pristine, images, tmp_path, capsys
) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    code, lines, _ = _edge(["run", str(pristine), str(images), "--classes", str(classes)], capsys)
    line = _error_line(lines)
    assert code == 1 and "one-domain bundle" in line and "vlm-edge classes" in line
    assert "--domain NAME" in line and "run the bundle" in line


DEEP = "[" * 100_000 + "]" * 100_000


def _deep_class_list(root: Path, bundle: Path) -> None:
    from vlm_export.runtime.text.class_lists import ClassListError, read_class_list

    (root / "deep.json").write_text(DEEP)
    with pytest.raises(ClassListError, match="levels deep"):
        read_class_list(root / "deep.json")


def _deep_bench_record(root: Path, bundle: Path) -> None:
    from vlm_export.runtime.bundle import Bundle
    from vlm_export.runtime.engines.checks.bench_record import best_recorded, record_path

    record_path(bundle).write_text(DEEP)
    assert best_recorded(Bundle.open(bundle)) is None  # ignored like any record it did not write


def _deep_split_file(root: Path, bundle: Path) -> None:
    from vlm_export.runtime.datasets.layouts import EvalSetError, load_test_set
    from vlm_export.runtime.datasets.registry import get_dataset

    dtd = get_dataset("dtd")
    (root / "dtd").mkdir()
    (root / "dtd" / str(dtd.split_file)).write_text(DEEP)
    with pytest.raises(EvalSetError, match="levels deep"):
        load_test_set(Bundle.open(bundle), root / "dtd", dtd)


def _deep_state_header(root: Path, bundle: Path) -> None:
    from vlm_export.core.errors import StateError
    from vlm_export.runtime.rail.models import load_predictor, state_header

    np.savez(root / "rail.npz", __meta__=np.array(DEEP))
    assert state_header(root / "rail.npz") is None
    with pytest.raises(StateError, match="levels deep"):
        load_predictor(root / "rail.npz", "fingerprint")


def _deep_manifest(root: Path, bundle: Path) -> None:
    from vlm_export.core.errors import BundleError

    (bundle / mf.MANIFEST_NAME).write_text(DEEP)
    with pytest.raises(BundleError, match="levels deep"):
        Bundle.open(bundle)


@pytest.mark.parametrize(
    "check",
    [_deep_class_list, _deep_bench_record, _deep_split_file, _deep_state_header, _deep_manifest],
)
def test_deeply_nested_json_is_refused_in_every_json_input(bundle, tmp_path, check) -> None:
    check(tmp_path, bundle)  # a RecursionError would escape as a traceback


def _many_members(path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for index in range(300):
            archive.writestr(f"a{index}.npy", b"")


def _rail_state(path: Path, extra: str) -> None:
    from vlm_export.core.state_file import save_state
    from vlm_export.runtime.rail.state import LEARNER_KIND, SCHEMA_VERSION

    arrays = {"weights": np.zeros((2, 2), np.float32), extra: np.zeros(1)}
    save_state(path, LEARNER_KIND, SCHEMA_VERSION, "fp", arrays, {"form": "primal"})


def _load_reservoir(path: Path, bundle: Path) -> None:
    build_reservoir(Bundle.open(bundle), state=path)


def _load_learner(path: Path, bundle: Path) -> None:
    from vlm_export.runtime.rail.state import load_learner_state

    load_learner_state(path, "fp")


def _load_inference(path: Path, bundle: Path) -> None:
    from vlm_export.runtime.rail.state import load_inference_state

    load_inference_state(path, "fp")


def _load_predictor(path: Path, bundle: Path) -> None:
    from vlm_export.runtime.rail.models import load_predictor

    load_predictor(path, "fp")


NPZ_LOADERS = [_load_reservoir, _load_learner, _load_inference, _load_predictor]


@pytest.mark.parametrize("load", NPZ_LOADERS)
def test_every_state_loader_refuses_too_many_members(pristine, tmp_path, load) -> None:
    from vlm_export.core.errors import StateError

    path = tmp_path / "state.npz"
    _many_members(path)
    with pytest.raises(StateError, match="holds 300 members; a state file holds at most 256"):
        load(path, pristine)


@pytest.mark.parametrize("load", NPZ_LOADERS)
def test_every_state_loader_refuses_members_it_does_not_know(
    pristine, saved_state, tmp_path, load
) -> None:
    from vlm_export.core.errors import StateError

    path = tmp_path / "state.npz"
    if load is _load_reservoir:
        _rewrite_state(saved_state, path, lambda arrays, meta: arrays.update(evil=np.zeros(1)))
    elif load is _load_inference:
        _rail_state(path, "evil")
        data = dict(np.load(path))
        meta = json.loads(str(data.pop("__meta__")))
        meta["kind"] = "rail-inference"
        np.savez(path, __meta__=np.array(json.dumps(meta)), **data)
    else:
        _rail_state(path, "evil")
    with pytest.raises(StateError, match="holds arrays this state does not have: 'evil'"):
        load(path, pristine)
    import zipfile

    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("notes.txt", b"hello")
    with pytest.raises(StateError, match="not an array of a state: 'notes.txt'"):
        load(path, pristine)


STATE_FILE_CASES = [
    ("JSON", lambda p: p.write_text('{"kind": "tca"}'), "it holds JSON, not a .npz archive"),
    ("text", lambda p: p.write_text("hello\n"), "it holds text or other data"),
]


@pytest.mark.parametrize(
    ("case", "write", "message"), STATE_FILE_CASES, ids=[c[0] for c in STATE_FILE_CASES]
)
def test_a_state_that_is_not_an_archive_is_named_for_what_it_is(
    pristine, images, tmp_path, capsys, case, write, message
) -> None:
    state = tmp_path / "state.npz"
    write(state)
    code, lines, _ = _edge(["run", str(pristine), str(images), "--state", str(state)], capsys)
    line = _error_line(lines)
    assert code == 1 and message in line and "pickled" not in line


def test_a_state_shape_of_1000_dimensions_is_cut_in_the_message(
    pristine, images, saved_state, tmp_path, capsys
) -> None:
    import zipfile

    state = tmp_path / "state.npz"
    with zipfile.ZipFile(saved_state) as archive, zipfile.ZipFile(state, "w") as out:
        for item in archive.infolist():
            data = archive.read(item)
            if item.filename == "unit_stacks.npy":
                data = _npy_header("(" + "1, " * 1000 + ")")
            out.writestr(item, data)
    code, lines, _ = _edge(["run", str(pristine), str(images), "--state", str(state)], capsys)
    line = _error_line(lines)
    assert code == 1 and "(1000 dimensions)" in line and len(line) < 400


def _manifest_value(bundle: Path, text: str, replacement: str) -> None:
    path = bundle / mf.MANIFEST_NAME
    content = path.read_text()
    assert text in content
    path.write_text(content.replace(text, replacement, 1))


MANIFEST_NUMBER_CASES = [
    ("lone surrogate", '"test"', '"te\\ud800st"', "lone surrogate"),
    ("infinite", "0.26862954", "1e400", "too large for a float"),
    ("subnormal", "0.26862954", "1e-310", "is subnormal"),
]


@pytest.mark.parametrize("command", ["info", "run"])
@pytest.mark.parametrize(
    ("case", "text", "replacement", "message"),
    MANIFEST_NUMBER_CASES,
    ids=[c[0] for c in MANIFEST_NUMBER_CASES],
)
def test_manifest_that_cannot_be_text_or_float_is_refused_at_open(
    bundle, images, capsys, command, case, text, replacement, message
) -> None:
    _manifest_value(bundle, text, replacement)
    argv = [command, str(bundle), *([str(images)] if command == "run" else [])]
    code, lines, _ = _edge(argv, capsys)
    assert code == 1 and message in _error_line(lines)


def test_info_refuses_a_capacity_that_cannot_fit_as_run_does(bundle, images, capsys) -> None:
    _manifest_value(bundle, '"capacity": 3', f'"capacity": {10**12}')
    for argv in (["info", str(bundle)], ["run", str(bundle), str(images)]):
        code, lines, _ = _edge([*argv, "--no-verify"], capsys)
        assert code == 1 and "TCA reservoir needs" in _error_line(lines)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lam", "1e308"], "lam must be a finite number from 0 to 1e+06"),
        (["--beta", "1e308"], "beta must be a finite number from 0 to 1e+06"),
    ],
)
def test_settings_beyond_float32_blame_the_setting(pristine, images, capsys, extra, message):
    code, lines, out = _edge(["run", str(pristine), str(images), "--quiet", *extra], capsys)
    assert code == 1 and message in _error_line(lines) and not out


def test_python_api_misuse_is_one_user_error(pristine, images) -> None:
    from vlm_export.core.errors import UserError

    for wrong in (None, 3, b"bundle"):
        with pytest.raises(UserError, match="open_pipeline needs a bundle folder"):
            open_pipeline(wrong)  # type: ignore[arg-type]
    with open_pipeline(pristine) as pipeline:
        pipeline.classify(next(images.iterdir()))
    with pytest.raises(UserError, match="the pipeline is closed"):
        pipeline.classify(next(images.iterdir()))  # ONNX Runtime said "Missing Input: anchors"
    pipeline.close()  # a second close is harmless


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval-tta", "B", "I", "--seed", "-1"], "--seed: expected a whole number >= 0"),
        (["eval-tta", "B", "I", "--seed", "²"], "--seed: expected a whole number >= 0"),
        (["run", "B", "9" * 30], "camera index 99999999999999999999... is out of range"),
        (["run", "B", str(2**31)], "camera index 2147483648 is out of range"),
    ],
)
def test_numbers_beyond_what_the_library_takes_are_one_line(
    pristine, images, capsys, argv, message
) -> None:
    argv = [str(pristine) if a == "B" else str(images) if a == "I" else a for a in argv]
    code, lines, _ = _edge(argv, capsys)
    assert code in (1, 2) and message in _error_line(lines)


def test_tokenizer_vocabulary_bomb_is_refused_within_its_cap(tmp_path) -> None:
    import gzip

    from vlm_export.runtime.text import tokenizer

    bomb = tmp_path / "vocab.txt.gz"
    with gzip.open(bomb, "wb") as handle:
        for _ in range(17):
            handle.write(bytes(1 << 20))  # 17 MB of zeros, 17 kB packed
    with pytest.raises(tokenizer.TokenizerError, match="unpacks to more than 16777216 bytes"):
        tokenizer.read_merges(bomb)
    big = tmp_path / "big.txt.gz"
    _sparse(9 << 20)(big)
    with pytest.raises(tokenizer.TokenizerError, match="larger than 8388608 bytes"):
        tokenizer.read_merges(big)


def test_ray_address_that_drops_packets_fails_within_seconds_and_says_so() -> None:
    import socket

    from vlm_export.runtime.rail.scaleout import RayError, _check_reachable, ray_endpoint

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    queued = []
    for _ in range(8):  # a full accept queue: the kernel drops further SYNs, as a firewall does
        client = socket.socket()
        client.setblocking(False)
        client.connect_ex(("127.0.0.1", port))
        queued.append(client)
    try:
        with pytest.raises(RayError, match=r"127\.0\.0\.1:\d+ \(no answer within 0\.5 s\)"):
            _check_reachable(f"127.0.0.1:{port}", seconds=0.5)
    finally:
        for client in queued:
            client.close()
        server.close()
    assert ray_endpoint("10.0.0.1") == ("10.0.0.1", 6379)
    assert ray_endpoint("ray://head") == ("head", 10001)
    assert ray_endpoint("[::1]:7000") == ("::1", 7000)
    assert ray_endpoint("auto") is None
    with pytest.raises(RayError, match="the port must be a number 1-65535"):
        ray_endpoint("head:99999")


def test_modes_heavier_than_rgb_count_for_more_pixels(tmp_path) -> None:
    from vlm_export.runtime.io.preprocess import ImageError, load_image

    for mode, array in (("RGBA", np.zeros((100, 100, 4), np.uint8)),
                        ("I;16", np.zeros((100, 100), np.uint16))):  # fmt: skip
        path = tmp_path / f"{mode.replace(';', '')}.png"
        Image.fromarray(array).save(path)
        assert load_image(path, max_pixels=30_000).mode == mode  # 10,000 pixels, weighed
        with pytest.raises(ImageError, match=f"a {mode} pixel counts"):
            load_image(path, max_pixels=15_000)
    rgb = _save_image(tmp_path / "rgb.png", (100, 100), "PNG")
    assert load_image(rgb, max_pixels=10_000).size == (100, 100)


def test_aspect_limit_follows_the_engine_input() -> None:
    from vlm_export.runtime.io.preprocess import aspect_limit

    assert aspect_limit((224, 224), "shortest") == 256
    assert aspect_limit((448, 448), "shortest") == 79  # the resize stays under 16 megapixels
    assert aspect_limit((32, 32), "longest") == 32  # the short side stays a pixel or more
