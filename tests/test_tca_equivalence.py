"""The split into engine + NumPy state is exact: bundle + runtime == an eager PyTorch TCA loop.

The eager side runs the whole algorithm literally from spec/tca.md, one image at a time: the
condensing ViT of tests/reference_tca.py with the anchors of the reservoir *before* the image,
zero-shot logits, reservoir insert + diversity eviction, anchors rebuilt, logit correction. The
runtime side is what a device runs: the exported ONNX engine in ONNX Runtime, preprocessing
skipped (random tensors), and vlm_export.runtime's reservoir and pipeline.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from reference_tca import reference_forward  # noqa: E402

from vlm_export.runtime.bundle import Bundle  # noqa: E402
from vlm_export.runtime.engines.factory import open_backend  # noqa: E402
from vlm_export.runtime.pipeline import Pipeline  # noqa: E402
from vlm_export.runtime.tca.stage import build_reservoir  # noqa: E402

NUM_FRAMES = 200
CLASSES = ["cat", "dog", "bird", "fish"]


class LiteralReservoir:
    """spec/tca.md section 3 with Python lists: entries (H, stack) per class."""

    def __init__(self, num_classes, capacity, tau, lam, beta, anchor_layers, anchor_rule):
        self.buffers = [[] for _ in range(num_classes)]
        self.capacity, self.tau, self.lam, self.beta = capacity, tau, lam, beta
        self.anchor_layers, self.anchor_rule = anchor_layers, anchor_rule

    def update(self, logits):
        s = torch.tensor(logits, dtype=torch.float64)
        entropy = float(-(s.softmax(0) * s.log_softmax(0)).sum())
        return entropy, int(torch.argmax(s))

    def insert(self, label, entropy, stack):
        buffer = self.buffers[label]
        buffer.append((entropy, stack))
        if len(buffer) > self.capacity:
            means = [torch.nn.functional.normalize(st.double().mean(0), dim=0) for _, st in buffer]
            scores = []
            for j, (h, _) in enumerate(buffer):
                others = [float(means[j] @ means[k]) for k in range(len(buffer)) if k != j]
                scores.append(h + sum(others) / len(others))
            del buffer[int(np.argmax(scores))]

    def anchors(self, width):
        count = len(self.buffers)
        anchors = torch.zeros(count, len(self.anchor_layers), width)
        valid = torch.zeros(count)
        if self.anchor_rule == "all_classes":
            active = [all(len(b) >= 2 for b in self.buffers)] * count
        else:
            active = [len(b) >= 1 for b in self.buffers]
        for c, buffer in enumerate(self.buffers):
            if active[c]:
                valid[c] = 1.0
                anchors[c] = torch.stack([st[self.anchor_layers] for _, st in buffer]).mean(0)
        return anchors, valid

    def correction(self, stack):
        layers = stack.shape[0]
        t = torch.linspace(0, 1, layers, dtype=torch.float64)
        w = torch.softmax(t / self.tau, 0)
        z = torch.zeros(len(self.buffers), dtype=torch.float64)
        for c, buffer in enumerate(self.buffers):
            for _, entry in buffer:
                cosines = torch.nn.functional.cosine_similarity(
                    stack.double(), entry.double(), dim=1
                )
                affinity = float((w * cosines).sum())
                z[c] += self.lam * math.exp(-self.beta * (1.0 - affinity))
        return z


@pytest.fixture(
    scope="module", params=[("mean", 2), ("consensus", 4)], ids=lambda p: f"{p[0]}-K{p[1]}"
)
def exported(request, tmp_path_factory, tiny_clip):
    from vlm_export.export.pipeline import ExportOptions, export_bundle
    from vlm_export.models.schedule import CondensationConfig

    folder = tmp_path_factory.mktemp("equivalence")
    checkpoint = folder / "tiny.pt"
    torch.save(tiny_clip.model.state_dict(), checkpoint)
    options = ExportOptions(
        method="tca",
        model="vlm-test-tiny",
        pretrained=str(checkpoint),
        domains=[("animals", CLASSES)],
        templates="single",
        condensation=CondensationConfig(
            drop_rate=0.1, merge_centers=request.param[1], ranking=request.param[0]
        ),
        out=folder / "bundle",
        quiet=True,
    )
    return export_bundle(options)


@pytest.mark.parametrize(
    ("anchor_rule", "warm"),
    [("all_classes", True), ("per_class", True), ("per_class", False)],
    ids=["reference-rule-warm", "per-class-warm", "per-class-cold"],
)
def test_runtime_equals_eager_tca_loop(exported, tiny_clip, anchor_rule, warm):
    bundle = Bundle.open(exported)
    reservoir = build_reservoir(bundle, {"anchor_rule": anchor_rule})
    config = reservoir.config
    condensation = bundle.manifest["condensation"]
    literal = LiteralReservoir(
        len(CLASSES),
        config.capacity,
        config.tau,
        config.lam,
        config.beta,
        condensation["anchor_layers"],
        anchor_rule,
    )
    text = torch.from_numpy(bundle.text_embeddings).double()
    visual = tiny_clip.model.visual
    width = bundle.manifest["model"]["width"]
    generator = torch.Generator().manual_seed(1234)
    run = (
        condensation["drop_rate"],
        condensation["merge_centers"],
        condensation["ranking"],
        condensation["reduction_layers"],
    )
    # Warm start, as a device resuming from a state file: two entries per class in both
    # reservoirs, so that the reference rule (every class >= 2 entries) has anchors on from frame 0.
    # Cold start: empty reservoirs; the per-class rule switches anchors on during the stream.
    no_anchor = torch.zeros(len(CLASSES), len(condensation["anchor_layers"]), width)
    for label in range(len(CLASSES) if warm else 0):
        for _ in range(2):
            image = torch.randn(3, 64, 64, generator=generator)
            _, stack, _ = reference_forward(
                visual, image, *run, no_anchor, torch.zeros(len(CLASSES))
            )
            logits = np.full(len(CLASSES), -5.0)
            logits[label] = 5.0
            reservoir.update(logits.astype(np.float32), stack.numpy())
            literal.insert(label, literal.update(logits)[0], stack)
    pipeline = Pipeline(bundle, open_backend(bundle, "onnxruntime"), "tca", reservoir=reservoir)
    frames_with_anchors = 0
    for index in range(NUM_FRAMES):
        image = torch.randn(3, 64, 64, generator=generator)
        anchors, valid = literal.anchors(width)
        frames_with_anchors += int(valid.any())
        embedding, stack, _ = reference_forward(visual, image, *run, anchors, valid)
        logits = 100.0 * (embedding.double() @ text.T)
        entropy, label = literal.update(logits.numpy())
        literal.insert(label, entropy, stack)
        expected = logits + literal.correction(stack)

        result = pipeline.process_tensor(image.numpy(), index=index)
        np.testing.assert_allclose(result.logits, expected.numpy(), atol=2e-3, rtol=1e-4)
        assert result.label == int(torch.argmax(expected)), f"frame {index}"
        counts = reservoir.counts()
        assert counts.tolist() == [len(b) for b in literal.buffers]
    if warm:
        assert frames_with_anchors == NUM_FRAMES, "anchors must be fed back through the stream"
    else:
        assert 0 < frames_with_anchors < NUM_FRAMES, "anchors must switch on during the stream"
