"""RAIL on the device through ``vlm-edge``: learn, eval (X-TAIL), merge, and run with a state.

One tiny random bundle is exported with method tca+rail and two domains of three classes; the
images are synthetic class patterns (PNG). The weights are random, so accuracies are only checked
for sanity, and for what the spec guarantees: zero-shot rows never change, and RAIL equals
zero-shot on a domain not learned yet when no image of it is gated into a learned class.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fakebundle import make_bundle
from PIL import Image

from vlm_export.core import memory
from vlm_export.runtime import cli
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.io.preprocess import Preprocessor
from vlm_export.runtime.rail import footprint, released
from vlm_export.runtime.rail.dual import DualAdapter
from vlm_export.runtime.rail.fusion import fuse
from vlm_export.runtime.rail.primal import PrimalAdapter
from vlm_export.runtime.rail.state import load_inference_state, load_learner_state
from vlm_export.runtime.rail.xtail import xtail_metrics

DOMAINS = [
    ("shapes", ["red circle", "green_square", "blue triangle"]),
    ("tools", ["hammer", "saw", "drill"]),
]
# folder names: the prompt form, the exact name, and the exact name with a space
SHAPE_FOLDERS = ["red_circle", "green_square", "blue triangle"]
FOLDERS = [("shapes", name) for name in SHAPE_FOLDERS] + [("tools", n) for n in DOMAINS[1][1]]
HIDDEN = ["--hidden-dim", "128"]


def _picture(cls: int, index: int) -> Image.Image:
    """Two class colours in stripes of a class width and slant, with per-image noise."""
    rng = np.random.default_rng(1000 * cls + index)
    first = np.array([(cls * 83) % 256, (cls * 151 + 60) % 256, (cls * 47 + 120) % 256])
    second = 255 - first
    y, x = np.mgrid[0:40, 0:48]
    stripes = (((x + (cls % 3) * y) // (3 + cls)) % 2)[..., None]
    pixels = stripes * first + (1 - stripes) * second + rng.normal(0, 20, (40, 48, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write(folder: Path, cls: int, indices: range | list[int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in indices:
        _picture(cls, index).save(folder / f"{index:02d}.png")


class Encoder:
    """The bundle's ONNX encoder run directly, all anchors invalid: the plain tower's features."""

    def __init__(self, bundle: Path) -> None:
        self.bundle = Bundle.open(bundle)
        self.session = ort.InferenceSession(
            str(self.bundle.onnx_path), providers=["CPUExecutionProvider"]
        )
        self.preprocess = Preprocessor.from_manifest(self.bundle.manifest)
        anchors = self.bundle.engine_io("inputs")["anchors"]["shape"]
        self.zeros = np.zeros(anchors, np.float32), np.zeros(anchors[0], np.float32)

    def __call__(self, images: list[Path | Image.Image]) -> np.ndarray:
        rows = []
        for image in images:
            tensor = self.preprocess.convert(image)[None]
            feeds = {"image": tensor, "anchors": self.zeros[0], "anchors_valid": self.zeros[1]}
            rows.append(self.session.run(["embedding"], feeds)[0][0])
        return np.stack(rows)

    def logits(self, features: np.ndarray) -> np.ndarray:
        return 100.0 * features @ self.bundle.text_embeddings.T


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    from vlm_export.export.pipeline import ExportOptions, export_bundle

    torch.manual_seed(0)

    out = tmp_path_factory.mktemp("rail") / "bundle"
    options = ExportOptions(
        method="tca+rail",
        model="vlm-test-tiny",
        domains=DOMAINS,
        out=out,
        templates="single",
        quiet=True,
    )
    return export_bundle(options)


@pytest.fixture(scope="module")
def encoder(bundle_dir: Path) -> Encoder:
    return Encoder(bundle_dir)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """learn/<domain>/<class>/: 4 images per class."""
    root = tmp_path_factory.mktemp("data")
    for cls, (domain, name) in enumerate(FOLDERS):
        _write(root / "learn" / domain / name, cls, range(4))
    return root


@pytest.fixture(scope="module")
def xtail(tmp_path_factory: pytest.TempPathFactory, encoder: Encoder) -> tuple[Path, list[str]]:
    """An X-TAIL root and a domain order: the first domain unsplit, the second split.

    The second domain's test images are pictures whose zero-shot prediction is not a class of the
    first domain: after learning the first domain none of them is gated into a learned class, so
    RAIL must equal zero-shot on them (spec 4). The order is chosen so that, whatever the random
    weights, such pictures exist.
    """
    root = tmp_path_factory.mktemp("xtail")
    pool = [_picture(cls, index) for cls in range(6) for index in range(10, 20)]
    predicted = encoder.logits(encoder(pool)).argmax(axis=1)
    outside = {
        domain: [image for image, label in zip(pool, predicted, strict=True) if label not in span]
        for domain, span in (("shapes", range(3)), ("tools", range(3, 6)))
    }
    first = max(outside, key=lambda domain: len(outside[domain]))
    second = "tools" if first == "shapes" else "shapes"
    for cls, (domain, name) in enumerate(FOLDERS):
        if domain == first:
            _write(root / domain / name, cls, range(5))
            continue
        _write(root / domain / "train" / name, cls, range(3))
        (root / domain / "test" / name).mkdir(parents=True)
        for index in range(2):
            image = outside[first][(2 * cls + index) % len(outside[first])]
            image.save(root / domain / "test" / name / f"{index:02d}.png")
    return root, [first, second]


def _edge(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, list[str]]:
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def _learn(
    capsys, bundle_dir: Path, data: Path, domain: str, state: Path, *extra: object, dual=False
) -> list[str]:
    """Learn ``domain`` (3 shots) into ``state``: primal with d_h 128, or dual."""
    form = ["--form", "dual"] if not state.exists() else []
    code, _, err = _edge(
        capsys, "learn", bundle_dir, data / "learn" / domain, "--domain", domain,
        "--state", state, "--shots", 3, *(form if dual else HIDDEN), *extra,
    )  # fmt: skip
    assert code == 0, err
    return err


def _fails(capsys, argv: list[object], message: str, keep: Path | None = None) -> str:
    """The command exits 1 with one error line (no traceback) and leaves ``keep`` as it was."""
    before = keep.read_bytes() if keep is not None and keep.exists() else None
    code, _, err = _edge(capsys, *argv)
    assert code == 1, err
    assert err[-1].startswith("vlm-edge: error: ") and message in err[-1], err
    assert all(line.startswith("vlm-edge: ") for line in err), err
    if keep is not None:
        assert (keep.read_bytes() if keep.exists() else None) == before
    return err[-1]


# ------------------------------------------------------------------ learn
def test_learn_two_domains_into_one_state(bundle_dir, data, encoder, tmp_path, capsys) -> None:
    state, inference = tmp_path / "rail.npz", tmp_path / "rail-inference.npz"
    err = _learn(capsys, bundle_dir, data, "shapes", state)
    assert any("embedded 9 images of 3 classes" in line for line in err)
    assert not any("solving" in line for line in err)  # a first batch: solved as it came
    learner = load_learner_state(state, encoder.bundle.fingerprint)
    assert isinstance(learner, PrimalAdapter) and learner.hidden_dim == 128
    assert learner.learned_mask.tolist() == [True] * 3 + [False] * 3
    # the first 3 files by name of each class, embedded with no anchors, with global labels
    paths = [
        data / "learn" / "shapes" / name / f"{i:02d}.png"
        for name in SHAPE_FOLDERS
        for i in range(3)
    ]
    expected = PrimalAdapter(32, 6, 128, 0.1, 0)
    expected.partial_fit(encoder(paths), np.repeat([0, 1, 2], 3))
    np.testing.assert_allclose(learner.gram, expected.gram, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(learner.cross, expected.cross, rtol=1e-5, atol=1e-6)

    err = _learn(capsys, bundle_dir, data, "tools", state, "--inference-state", inference)
    assert "vlm-edge: solving the 128 x 128 ridge system" in "\n".join(err)  # said before it
    assert any(line.startswith(f"vlm-edge: continuing {state}: primal") for line in err)
    learner = load_learner_state(state, encoder.bundle.fingerprint)
    assert learner.learned_mask.all() and learner.num_samples == 18 and learner.solved
    predictor = load_inference_state(inference, encoder.bundle.fingerprint)
    probe = encoder([data / "learn" / "tools" / "saw" / "03.png"])
    np.testing.assert_allclose(predictor.predict(probe), learner.predict(probe), atol=1e-4)


def test_learn_forms_routes_and_all_shots(bundle_dir, data, encoder, tmp_path, capsys) -> None:
    cholesky, woodbury = tmp_path / "c.npz", tmp_path / "w.npz"
    _learn(capsys, bundle_dir, data, "tools", cholesky)
    _learn(capsys, bundle_dir, data, "tools", woodbury, "--route", "woodbury")
    probe = encoder([data / "learn" / "tools" / "drill" / "03.png"])
    fingerprint = encoder.bundle.fingerprint
    first, second = (load_learner_state(p, fingerprint) for p in (cholesky, woodbury))
    assert second.route == "woodbury" and second.gram is None
    np.testing.assert_allclose(second.predict(probe), first.predict(probe), atol=1e-8)
    dual = tmp_path / "d.npz"
    _learn(capsys, bundle_dir, data, "tools", dual, "--shots", 0, dual=True)
    learner = load_learner_state(dual, fingerprint)
    assert isinstance(learner, DualAdapter) and learner.num_samples == 12  # --shots 0: all 4 each
    assert learner.labels.tolist() == [5] * 4 + [3] * 4 + [4] * 4  # drill, hammer, saw


def test_learn_bad_input_leaves_the_state_alone(
    bundle_dir, data, tmp_path, capsys, monkeypatch
) -> None:
    state = tmp_path / "rail.npz"
    _learn(capsys, bundle_dir, data, "shapes", state)
    bad = tmp_path / "bad"

    def learn(folder: Path, *extra: object) -> list[object]:
        base = ["learn", bundle_dir, folder, "--domain", "tools", "--state", state, "--shots", 3]
        return [*base, *extra]

    _write(bad / "wrong" / "screwdriver", 0, range(3))
    _fails(capsys, learn(bad / "wrong"), "screwdriver is not a class of domain 'tools'", state)
    _fails(capsys, learn(data / "learn" / "tools", "--domain", "boats"), "no domain 'boats'", state)
    (bad / "empty" / "saw").mkdir(parents=True)
    _fails(capsys, learn(bad / "empty"), "has no images", state)
    _write(bad / "few" / "saw", 4, range(2))
    _fails(capsys, learn(bad / "few"), "has 2 images, fewer than --shots 3", state)
    _write(bad / "corrupt" / "saw", 4, range(3))
    (bad / "corrupt" / "saw" / "01.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _fails(capsys, learn(bad / "corrupt"), "cannot read image", state)
    _write(bad / "twice" / "red circle", 0, range(3))
    _write(bad / "twice" / "red_circle", 0, range(3))
    args = ["learn", bundle_dir, bad / "twice", "--domain", "shapes", "--state", state]
    _fails(capsys, [*args, "--shots", 3], "are both class 'red circle'", state)
    shapes = data / "learn" / "shapes"
    message = "has already learned red circle, green_square, blue triangle"
    _fails(capsys, learn(shapes, "--domain", "shapes"), message, state)
    tools = data / "learn" / "tools"
    _fails(capsys, learn(tools, "--hidden-dim", 64), "was learned with hidden-dim 128", state)
    _fails(capsys, learn(tools, "--form", "dual"), "was learned with form primal", state)
    _fails(capsys, learn(tools, "--inference-state", state), "is --state", state)
    _fails(capsys, learn(tools, "--shots", -1), "--shots must be 0 or more", state)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    message = "is a file, not a folder"  # refused before any image is embedded
    _fails(capsys, learn(tools, "--inference-state", blocked / "inf.npz"), message, state)
    other = make_bundle(tmp_path / "other", method="tca+rail", seed=1)  # another image engine
    argv = ["learn", other, tools, "--domain", "vehicles", "--state", state]
    _fails(capsys, argv, "another bundle", state)

    solve = released.potrs_lower

    def infinite(factor: np.ndarray, rhs: np.ndarray) -> int:
        info = solve(factor, rhs)  # in place
        rhs[...] = np.inf
        return info

    monkeypatch.setattr(released, "potrs_lower", infinite)
    _fails(capsys, learn(tools), "non-finite", state)


def test_learn_reads_a_domain_root_and_takes_the_only_domain(
    bundle_dir, data, encoder, tmp_path, capsys
) -> None:
    """DATA_DIR/<domain>/<class>/ learns what DATA_DIR/<domain> does, and says which layout it
    found; --domain may be left out only when the bundle has one domain."""
    by_class, by_domain = tmp_path / "class.npz", tmp_path / "domain.npz"
    err = _learn(capsys, bundle_dir, data, "shapes", by_class)
    assert f"vlm-edge: layout ROOT/CLASS: class folders in {data / 'learn' / 'shapes'}" in err
    code, _, err = _edge(
        capsys, "learn", bundle_dir, data / "learn", "--domain", "shapes", "--state", by_domain,
        "--shots", 3, *HIDDEN,
    )  # fmt: skip
    assert code == 0 and any("layout ROOT/DOMAIN/CLASS: 1 domain folder(s)" in e for e in err)
    fingerprint = encoder.bundle.fingerprint
    first, second = (load_learner_state(p, fingerprint) for p in (by_class, by_domain))
    np.testing.assert_array_equal(first.gram, second.gram)
    argv = ["learn", bundle_dir, data / "learn" / "tools", "--state", tmp_path / "x.npz"]
    _fails(capsys, argv, "the bundle has 2 domains (shapes, tools): name one with --domain")

    torch = pytest.importorskip("torch")
    from vlm_export.export.pipeline import ExportOptions, export_bundle

    torch.manual_seed(0)
    options = ExportOptions(
        method="rail",
        model="vlm-test-tiny",
        domains=DOMAINS[1:],
        out=tmp_path / "one",
        templates="single",
        quiet=True,
    )
    one = export_bundle(options)
    state = tmp_path / "one.npz"
    code, _, err = _edge(
        capsys, "learn", one, data / "learn", "--state", state, "--shots", 3, *HIDDEN
    )
    assert code == 0, err
    assert "vlm-edge: domain tools (the bundle's only one)" in err
    assert any("layout ROOT/DOMAIN/CLASS" in line for line in err)
    assert load_learner_state(state, Bundle.open(one).fingerprint).num_samples == 9


# ------------------------------------------------------------------ eval
def test_eval_fills_the_whole_table(bundle_dir, xtail, tmp_path, capsys) -> None:
    root, order = xtail
    out = tmp_path / "xtail.json"
    argv = ["eval", bundle_dir, root, "--order", ",".join(order), "--shots", 3, *HIDDEN]
    code, stdout, err = _edge(capsys, *argv, "--method", "zeroshot", "--json", out)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["order"] == order and report["base"] == "zeroshot"
    first, second = report["domains"]
    assert (first["split"], first["train_images"], first["test_images"]) == ("shots", 9, 6)
    assert (second["split"], second["train_images"], second["test_images"]) == ("folders", 9, 6)
    assert second["classes"] == dict(DOMAINS)[order[1]]
    results = report["results"]
    assert set(results) == {"zeroshot", "primal", "dual"}
    for name, result in results.items():
        table = np.array(result["table"])
        assert table.shape == (2, 2) and ((table >= 0) & (table <= 1)).all(), name
        assert {k: result[k] for k in ("transfer", "average", "last")} == xtail_metrics(table)
    zeroshot = np.array(results["zeroshot"]["table"])
    np.testing.assert_array_equal(zeroshot[0], zeroshot[1])  # zero-shot does not learn
    for form in ("primal", "dual"):
        # after the first domain, no test image of the second is gated: RAIL equals zero-shot
        assert results[form]["table"][0][1] == zeroshot[0, 1]
        assert results[form]["transfer"] == results["zeroshot"]["transfer"]
    assert results["primal"]["hidden_dim"] == 128 and results["dual"]["gamma"] == 0.1
    lines = stdout.splitlines()
    for method in ("zeroshot", "primal", "dual"):
        header = next(line for line in lines if line.split()[:1] == [method] and order[0] in line)
        assert header.split()[1:] == order
        metrics = [f"{100 * results[method][key]:.1f}" for key in ("transfer", "average", "last")]
        assert [method, *metrics] in [line.split() for line in lines]
    cells = [f"{100 * value:.1f}" for value in zeroshot[0]]
    assert any(line.split() == ["1", "after", order[0], *cells] for line in lines)

    # default base: the bundle's tca; one form; a test cap of one image per class
    code, _, err = _edge(capsys, *argv, "--form", "primal", "--test-per-class", 1, "--json", out)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["base"] == "tca" and set(report["results"]) == {"zeroshot", "primal"}
    assert [d["test_images"] for d in report["domains"]] == [3, 3]


def test_eval_of_a_given_state_learns_nothing(
    bundle_dir, data, xtail, encoder, tmp_path, capsys
) -> None:
    """--rail-state: zero-shot and the state's fused accuracy on each domain's test images, the
    state left as it was; zero-shot equals the learning run's first row."""
    root, order = xtail
    state, inference = tmp_path / "s.npz", tmp_path / "i.npz"
    _learn(capsys, bundle_dir, data, order[0], state)
    _learn(capsys, bundle_dir, data, order[1], state, "--inference-state", inference)
    before = state.read_bytes()
    out, learned = tmp_path / "state.json", tmp_path / "learned.json"
    argv = ["eval", bundle_dir, root, "--order", ",".join(order), "--shots", 3, "--method"]
    code, _, err = _edge(capsys, *argv, "zeroshot", *HIDDEN, "--json", learned)
    message = f"vlm-edge: learning {', '.join(order)} in order (primal, dual), testing after each"
    assert code == 0 and message in err
    plot = tmp_path / "state.png"
    extra = ["--rail-state", inference, "--json", out, "--plot", plot]
    code, stdout, err = _edge(capsys, *argv, "zeroshot", *extra)
    assert code == 0, err
    assert f"vlm-edge: testing {inference} on {', '.join(order)} without learning" in err
    assert state.read_bytes() == before
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"zeroshot", "rail"} and report["rail_state"] == str(inference)
    first_row = json.loads(learned.read_text())["results"]["zeroshot"]["table"][0]
    assert report["results"]["zeroshot"]["accuracy"] == first_row
    predictor = load_inference_state(inference, encoder.bundle.fingerprint)
    beta = report["results"]["rail"]["beta"]
    for j, domain in enumerate(order):
        paths = sorted((root / domain).glob("test/*/*.png")) or sorted(
            p for p in (root / domain).glob("*/*.png") if int(p.stem) >= 3
        )
        labels = np.array([FOLDERS.index((domain, p.parent.name)) for p in paths])
        features = encoder(paths)
        scores = fuse(
            encoder.logits(features), predictor.predict(features), predictor.learned_mask, beta
        )
        expected = float(np.mean(scores.argmax(axis=1) == labels))
        assert report["results"]["rail"]["accuracy"][j] == pytest.approx(expected, abs=1e-9)
    assert "Average" in stdout and Image.open(plot).format == "PNG"
    rail, zeroshot = (report["results"][m]["accuracy"] for m in ("rail", "zeroshot"))
    assert rail != zeroshot  # the state changed some decisions
    _fails(
        capsys, [*argv, "zeroshot", "--rail-state", inference, "--form", "dual"], "--form is for"
    )
    # a state that cannot be read fails before the test set is embedded (minutes on a device)
    code, _, err = _edge(capsys, *argv, "zeroshot", "--rail-state", tmp_path / "none.npz")
    assert code == 1 and "not found" in err[-1], err
    assert not any("embedding" in line or "learning" in line for line in err), err


def test_eval_reads_a_class_folder_root_for_one_domain(bundle_dir, xtail, tmp_path, capsys):
    root, (unsplit, second) = xtail
    results = []
    for data in (root, root / unsplit):
        out = tmp_path / "r.json"
        argv = ["eval", bundle_dir, data, "--order", unsplit, "--shots", 3, "--json", out, *HIDDEN]
        code, _, err = _edge(capsys, *argv)
        assert code == 0, err
        kind = "ROOT/DOMAIN/CLASS" if data == root else "ROOT/CLASS"
        assert any(f"layout {kind}" in line for line in err)
        results.append(json.loads(out.read_text())["results"])
    assert results[0] == results[1]
    argv = ["eval", bundle_dir, root / unsplit, "--order", f"{unsplit},{second}", "--shots", 3]
    _fails(capsys, argv, "holds no domain folder: several domains need")


def test_eval_bad_input(bundle_dir, xtail, tmp_path, capsys) -> None:
    root, (unsplit, _) = xtail
    argv = ["eval", bundle_dir, root, "--shots", 3]
    _fails(capsys, [*argv, "--order", f"{unsplit},boats"], "no domain 'boats'")
    _fails(capsys, [*argv, "--order", f"{unsplit},{unsplit}"], f"names {unsplit} more than once")
    _fails(capsys, [*argv, "--order", unsplit, "--shots", 5], "no test images")
    _fails(capsys, [*argv, "--order", unsplit, "--shots", 0], "needs --shots of 1 or more")
    argv += ["--order", unsplit, "--form", "dual", "--seed", 1]
    _fails(capsys, argv, "primal form only")
    (tmp_path / "shapes" / "train").mkdir(parents=True)
    argv = ["eval", bundle_dir, tmp_path, "--order", "shapes"]
    _fails(capsys, argv, "has a train/ folder but no test/ folder")


# ------------------------------------------------------------------ merge
@pytest.mark.parametrize("form", ["primal", "dual"])
def test_merge_equals_learning_everything(bundle_dir, data, encoder, tmp_path, capsys, form):
    fingerprint = encoder.bundle.fingerprint
    device_a, device_b, both = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "ab.npz"
    dual = form == "dual"
    _learn(capsys, bundle_dir, data, "shapes", device_a, dual=dual)
    _learn(capsys, bundle_dir, data, "tools", device_b, dual=dual)
    _learn(capsys, bundle_dir, data, "shapes", both, dual=dual)
    _learn(capsys, bundle_dir, data, "tools", both, dual=dual)
    merged = tmp_path / "merged.npz"
    code, _, err = _edge(
        capsys, "merge", merged, device_a, device_b, "--bundle", bundle_dir,
        "--inference-state", tmp_path / "merged-inference.npz",
    )  # fmt: skip
    assert code == 0, err
    merged_line = f"vlm-edge: merged 2 learner states into {merged}: {form}"
    assert err[-2].startswith(merged_line)  # the learner state first, then the inference state
    assert err[-1].startswith("vlm-edge: inference state saved to")
    joint, reference = (load_learner_state(p, fingerprint) for p in (merged, both))
    assert joint.learned_mask.all() and joint.num_samples == reference.num_samples == 18
    if form == "primal":
        np.testing.assert_allclose(joint.gram, reference.gram, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(joint.cross, reference.cross, rtol=1e-12, atol=1e-12)
    else:
        np.testing.assert_array_equal(joint.labels, reference.labels)
        np.testing.assert_allclose(joint.inverse, reference.inverse, rtol=1e-6, atol=1e-6)
    probe = encoder([data / "learn" / "tools" / "saw" / "03.png"])
    np.testing.assert_allclose(joint.predict(probe), reference.predict(probe), atol=1e-6)
    predictor = load_inference_state(tmp_path / "merged-inference.npz", fingerprint)
    np.testing.assert_allclose(predictor.predict(probe), reference.predict(probe), atol=1e-4)


def test_merge_refusals(bundle_dir, data, tmp_path, capsys) -> None:
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    _learn(capsys, bundle_dir, data, "shapes", a)
    _learn(capsys, bundle_dir, data, "tools", b)
    out = tmp_path / "out.npz"
    _fails(capsys, ["merge", a, a, b], "is STATE", a)
    _fails(capsys, ["merge", out, a], "at least two learner states")
    _fails(capsys, ["merge", out, a, b, a], "is given twice")
    hard = tmp_path / "a-again.npz"
    os.link(a, hard)  # another name of the same file: its samples would count twice too
    _fails(capsys, ["merge", out, a, b, hard], "is given twice")
    seeded = tmp_path / "seeded.npz"
    _learn(capsys, bundle_dir, data, "tools", seeded, "--seed", 7)
    _fails(capsys, ["merge", out, a, seeded], "has seed = 7, state 0 has 0")
    woodbury = tmp_path / "woodbury.npz"
    _learn(capsys, bundle_dir, data, "tools", woodbury, "--route", "woodbury")
    _fails(capsys, ["merge", out, a, woodbury], "woodbury route")
    dual = tmp_path / "dual.npz"
    _learn(capsys, bundle_dir, data, "tools", dual, dual=True)
    _fails(capsys, ["merge", out, a, dual], "cannot merge primal and dual")
    other = make_bundle(tmp_path / "other", method="tca+rail")
    _fails(capsys, ["merge", out, a, b, "--bundle", other], "another bundle")
    foreign = tmp_path / "foreign.npz"
    raw = np.load(b)
    arrays = {name: raw[name] for name in raw.files}
    meta = json.loads(str(arrays["__meta__"]))
    arrays["__meta__"] = np.array(json.dumps({**meta, "bundle": "0123456789abcdef"}))
    np.savez(foreign, **arrays)
    _fails(capsys, ["merge", out, a, foreign], "another bundle (fingerprint 0123456789abcdef)")
    assert not out.exists()


# ------------------------------------------------------------------ run
def test_run_with_a_rail_state(bundle_dir, data, encoder, tmp_path, capsys) -> None:
    state, inference = tmp_path / "rail.npz", tmp_path / "rail-inference.npz"
    _learn(capsys, bundle_dir, data, "shapes", state)
    _learn(capsys, bundle_dir, data, "tools", state, "--inference-state", inference)
    folder = data / "learn" / "tools" / "saw"
    out = tmp_path / "rail.jsonl"
    argv = ["run", bundle_dir, folder, "--topk", 6, "--out", out]
    code, _, err = _edge(capsys, *argv, "--method", "rail", "--rail-state", state)
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4
    # rail: zero-shot logits of the plain tower, fused with the solved learner (beta 0.8)
    features = encoder(sorted(folder.iterdir()))
    learner = load_learner_state(state, encoder.bundle.fingerprint)
    expected = fuse(encoder.logits(features), learner.predict(features), learner.learned_mask)
    for record, scores in zip(records, expected, strict=True):
        assert "fusion" in record["timings_ms"] and "reservoir" not in record["timings_ms"]
        assert record["label"] == int(np.argmax(scores))
        got = {entry["index"]: entry["score"] for entry in record["topk"]}
        np.testing.assert_allclose([got[i] for i in range(6)], scores, atol=2e-5)

    # tca+rail (the bundle's method, the default once a RAIL state is given), inference state
    code, _, err = _edge(capsys, "run", bundle_dir, folder, "--out", out, "--rail-state", inference)
    assert code == 0, err
    assert any(line.startswith("vlm-edge: tca+rail on ") for line in err)
    for record in (json.loads(line) for line in out.read_text().splitlines()):
        assert {"reservoir", "correction", "fusion"} <= set(record["timings_ms"])
        assert 0 <= record["label"] < 6

    _fails(capsys, ["run", bundle_dir, folder, "--method", "rail"], "needs --rail-state FILE")
    argv = ["run", bundle_dir, folder, "--method", "tca", "--rail-state", state]
    _fails(capsys, argv, "--rail-state needs --method rail or tca+rail")
    other = make_bundle(tmp_path / "other", method="tca+rail")
    _fails(capsys, ["run", other, folder, "--rail-state", state], "another bundle")
    reservoir = tmp_path / "reservoir.npz"
    argv = ["run", bundle_dir, folder, "--out", out, "--state", reservoir, "--method", "tca"]
    assert _edge(capsys, *argv)[0] == 0
    _fails(
        capsys, ["run", bundle_dir, folder, "--rail-state", reservoir], "expected 'rail-inference'"
    )


# ------------------------------------------------------------------ memory
def test_sizes_that_do_not_fit_are_refused_before_work(
    bundle_dir, data, tmp_path, capsys, monkeypatch
) -> None:
    state, tools = tmp_path / "rail.npz", data / "learn" / "tools"
    argv = ["learn", bundle_dir, tools, "--domain", "tools", "--state", state, "--shots", 3]
    line = _fails(capsys, [*argv, "--hidden-dim", 10_000_000], "--hidden-dim", state)
    assert "d_h 10000000" in line and "available" in line
    fits = int(line.rsplit("--hidden-dim ", 1)[1].split()[0])
    assert 0 < fits < 10_000_000 and footprint.primal_peak_bytes(32, 6, fits) <= (
        memory.available_bytes()
    )
    assert not state.exists()
    _learn(capsys, bundle_dir, data, "shapes", state)  # d_h 128
    other = tmp_path / "other.npz"
    _learn(capsys, bundle_dir, data, "tools", other)
    monkeypatch.setattr(memory, "available_bytes", lambda: 200 * 2**20)  # below the process
    line = _fails(capsys, argv, f"continuing {state}", state)
    assert "even --hidden-dim 1 does not fit" in line
    merged = tmp_path / "merged.npz"
    _fails(capsys, ["merge", merged, state, other], "merging", state)
    assert not merged.exists()
    dual = ["learn", bundle_dir, tools, "--domain", "tools", "--state", tmp_path / "dual.npz"]
    line = _fails(capsys, [*dual, "--form", "dual", "--shots", 0], "the dual learner (12 samples")
    assert "samples fit the dual form here: learn with --form primal" in line


# ------------------------------------------------------------------ damaged and concurrent states
def _with_header(source: Path, target: Path, **fields: object) -> Path:
    """A copy of a state file with header fields changed."""
    raw = np.load(source)
    arrays = {name: raw[name] for name in raw.files}
    meta = json.loads(str(arrays["__meta__"]))
    arrays["__meta__"] = np.array(json.dumps({**meta, **fields}))
    np.savez(target, **arrays)
    return target


def test_a_header_with_huge_sizes_is_one_line_everywhere(bundle_dir, data, tmp_path, capsys):
    """Sizes the arrays do not have (2**70 wide: NumPy's ValueError; 2**40: 80 TiB asked) are
    refused as a corrupt state by run, merge and learn, before anything is allocated."""
    primal, dual = tmp_path / "primal.npz", tmp_path / "dual.npz"
    _learn(capsys, bundle_dir, data, "shapes", primal)
    _learn(capsys, bundle_dir, data, "shapes", dual, dual=True)
    image = next((data / "learn" / "shapes" / "red_circle").iterdir())
    for good, fields in ((dual, {"in_dim": 2**70}), (primal, {"in_dim": 2**40, "hidden_dim": 0})):
        bad = _with_header(good, tmp_path / f"bad-{good.name}", **fields)
        copy = tmp_path / "learn-copy.npz"
        copy.write_bytes(bad.read_bytes())
        tools = data / "learn" / "tools"
        for argv in (
            ["run", bundle_dir, image, "--method", "rail", "--rail-state", bad, "--quiet"],
            ["merge", tmp_path / "merged.npz", bad, good],
            ["learn", bundle_dir, tools, "--domain", "tools", "--state", copy, "--shots", 3],
        ):
            _fails(capsys, argv, "should be float64", copy)
        assert not (tmp_path / "merged.npz").exists()


def test_merge_refuses_a_first_state_whose_labels_no_reader_takes(
    bundle_dir, data, tmp_path, capsys
):
    """merge copies the first state's engine and labels into OUT: a corrupt record is refused
    as run refuses it, not written into an OUT that nobody can read."""
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    _learn(capsys, bundle_dir, data, "shapes", a)
    _learn(capsys, bundle_dir, data, "tools", b)
    out = tmp_path / "out.npz"
    meta = json.loads(str(np.load(a)["__meta__"]))
    for index, (fields, message) in enumerate(
        [
            ({"labels": -1}, "has a corrupt header (field 'labels')"),
            ({"labels": meta["labels"][:-1]}, "records 5 labels for 6 classes"),
            ({"engine": 7}, "has a corrupt header (field 'engine')"),
        ]
    ):
        bad = _with_header(a, tmp_path / f"bad{index}.npz", **fields)
        _fails(capsys, ["merge", out, bad, b], message)
        assert not out.exists()
    code, _, err = _edge(capsys, "merge", out, a, b)
    assert code == 0, err
    assert json.loads(str(np.load(out)["__meta__"]))["labels"] == meta["labels"]


def _saved_meanwhile(monkeypatch, module: object, name: str, state: Path, saved: Path) -> None:
    """While ``module.name`` runs, another run saves ``saved`` over ``state`` (atomically)."""
    work = getattr(module, name)

    def working_while_another_saves(*args: object, **kwargs: object) -> object:
        copy = state.with_name(".another-run")
        copy.write_bytes(saved.read_bytes())
        os.replace(copy, state)
        return work(*args, **kwargs)

    monkeypatch.setattr(module, name, working_while_another_saves)


def test_learn_refuses_to_save_over_what_another_run_saved_meanwhile(
    bundle_dir, data, tmp_path, capsys, monkeypatch
) -> None:
    """Two learns continuing one state at once: the second to save is refused in one line and
    its state is what the first saved (nothing lost: running it again continues that)."""
    from vlm_export.runtime.commands import learn

    state, both = tmp_path / "rail.npz", tmp_path / "both.npz"
    _learn(capsys, bundle_dir, data, "shapes", state)
    both.write_bytes(state.read_bytes())
    _learn(capsys, bundle_dir, data, "tools", both)  # what the other run saves: shapes + tools
    with monkeypatch.context() as patch:
        _saved_meanwhile(patch, learn, "embed_images", state, both)
        tools = data / "learn" / "tools"
        argv = ["learn", bundle_dir, tools, "--domain", "tools", "--state", state, "--shots", 3]
        line = _fails(capsys, argv, f"{state} changed while learning (another run saved it)")
        assert line.endswith("nothing saved: run again")
    assert state.read_bytes() == both.read_bytes()
    _fails(capsys, argv, "has already learned hammer, saw, drill", state)
    fresh = tmp_path / "fresh.npz"  # none when the run started, one when it saves
    with monkeypatch.context() as patch:
        _saved_meanwhile(patch, learn, "embed_images", fresh, both)
        argv = ["learn", bundle_dir, tools, "--domain", "tools", "--state", fresh, "--shots", 3]
        _fails(capsys, argv, "changed while learning")
    assert fresh.read_bytes() == both.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["both.npz", "fresh.npz", "rail.npz"]


def test_merge_refuses_to_save_over_what_another_run_saved_meanwhile(
    bundle_dir, data, tmp_path, capsys, monkeypatch
) -> None:
    from vlm_export.runtime.commands import merge

    a, b, out = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "out.npz"
    _learn(capsys, bundle_dir, data, "shapes", a)
    _learn(capsys, bundle_dir, data, "tools", b)
    out.write_bytes(a.read_bytes())
    _saved_meanwhile(monkeypatch, merge, "merge_learner_files", out, b)
    _fails(capsys, ["merge", out, a, b], f"{out} changed while merging (another run saved it)")
    assert out.read_bytes() == b.read_bytes()
