"""Text side of the exporter: template sets, class lists, --domain parsing, text embeddings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vlm_export.core.errors import UserError
from vlm_export.runtime.text.class_lists import (
    ClassListError,
    DomainLabel,
    parse_domain_args,
    prompt_name,
    read_class_list,
    shared_class_names,
    union_labels,
)
from vlm_export.runtime.text.templates import (
    BUILTIN_TEMPLATES,
    TemplateError,
    check_templates,
    fill_template,
    load_templates,
    template_set_names,
)

DATASETS = (
    "caltech101",
    "dtd",
    "eurosat",
    "fgvc_aircraft",
    "food101",
    "oxford_flowers",
    "oxford_pets",
    "stanford_cars",
    "sun397",
    "ucf101",
    "imagenet",
    "imagenet_a",
    "imagenet_v2",
    "imagenet_r",
    "imagenet_sketch",
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---- templates -------------------------------------------------------------------------------


def test_imagenet80_has_80_distinct_templates_each_with_one_placeholder():
    templates = load_templates("imagenet80")
    assert len(templates) == 80
    assert len(set(templates)) == 80
    assert all(t.count("{}") == 1 for t in templates)


def test_builtin_sets_are_well_formed_and_cover_the_benchmarks():
    names = template_set_names()
    assert {"imagenet80", "imagenet7", "single", *DATASETS} <= set(names)
    for name in names:
        templates = load_templates(name)
        assert templates and all(t.count("{}") == 1 for t in templates), name
    assert load_templates("single") == ("a photo of a {}.",)
    assert load_templates("eurosat") == ("a centered satellite photo of {}.",)
    assert load_templates("food101") == ("a photo of {}, a type of food.",)
    assert load_templates("dtd") == ("{} texture.",)
    assert load_templates("ucf101") == ("a photo of a person doing {}.",)
    # Released TDA code: 7-template ensemble for ImageNet/-A/-V2, the 80 for -R/-Sketch.
    assert load_templates("imagenet") == load_templates("imagenet7")
    assert load_templates("imagenet_r") == load_templates("imagenet80")


def test_templates_match_open_clip_metadata():
    loading = pytest.importorskip("vlm_export.models.loading")
    metadata = loading.open_clip.zero_shot_metadata
    assert load_templates("imagenet80") == tuple(
        f("{}") for f in metadata.OPENAI_IMAGENET_TEMPLATES
    )
    assert load_templates("imagenet7") == tuple(f("{}") for f in metadata.SIMPLE_IMAGENET_TEMPLATES)


def test_templates_and_class_lists_import_without_torch_or_open_clip():
    code = (
        "import sys, vlm_export.runtime.text.templates, vlm_export.runtime.text.class_lists; "
        "print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_fill_template_is_plain_replacement():
    assert fill_template("a photo of a {}.", "cat") == "a photo of a cat."
    assert fill_template("{} with {braces}", "x{0}") == "x{0} with {braces}"


def test_load_template_file_skips_blanks_and_comments(tmp_path):
    path = _write(tmp_path / "t.txt", "# my prompts\n\n  a photo of a {}.  \n{} in the wild\n\n")
    assert load_templates(str(path)) == ("a photo of a {}.", "{} in the wild")


def test_template_file_line_without_placeholder_is_named(tmp_path):
    path = _write(tmp_path / "t.txt", "a photo of a {}.\n# comment\na photo\n")
    with pytest.raises(TemplateError, match=r"line 3.*exactly one \{\}"):
        load_templates(str(path))
    _write(path, "a {} and a {}\n")
    with pytest.raises(TemplateError, match=r"line 1.*found 2"):
        load_templates(str(path))


def test_empty_template_file_is_refused(tmp_path):
    path = _write(tmp_path / "t.txt", "# only a comment\n\n")
    with pytest.raises(TemplateError, match="no templates"):
        load_templates(str(path))


def test_unknown_template_set_lists_builtin_names():
    with pytest.raises(TemplateError) as info:
        load_templates("imagenet81")
    message = str(info.value)
    assert "\n" not in message
    assert all(name in message for name in BUILTIN_TEMPLATES)
    assert issubclass(TemplateError, UserError)


def test_check_templates():
    assert check_templates(["{}!"]) == ("{}!",)
    with pytest.raises(TemplateError, match="empty"):
        check_templates([])
    with pytest.raises(TemplateError, match="one string"):
        check_templates("a {}")
    with pytest.raises(TemplateError, match="#2"):
        check_templates(["a {}", "b"])


# ---- class lists -----------------------------------------------------------------------------


def test_read_text_class_list(tmp_path):
    path = _write(tmp_path / "c.txt", "# classes\n  golden_retriever \n\ntabby cat\n")
    assert read_class_list(path) == ["golden_retriever", "tabby cat"]


def test_read_json_class_list(tmp_path):
    path = _write(tmp_path / "c.json", json.dumps(["dog", " cat "]))
    assert read_class_list(str(path)) == ["dog", "cat"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"a": 1}', "JSON list of strings"),
        ('["a", 2]', "JSON list of strings"),
        ('["a", " "]', "empty class name"),
        ("[", "not valid JSON"),
        ("[]", "no class names"),
    ],
)
def test_bad_json_class_lists(tmp_path, text, match):
    path = _write(tmp_path / "c.json", text)
    with pytest.raises(ClassListError, match=match):
        read_class_list(path)


def test_class_list_errors(tmp_path):
    with pytest.raises(ClassListError, match="not found"):
        read_class_list(tmp_path / "missing.txt")
    with pytest.raises(ClassListError, match="no class names"):
        read_class_list(_write(tmp_path / "e.txt", "# nothing\n\n"))
    with pytest.raises(ClassListError, match="more than once") as info:
        read_class_list(_write(tmp_path / "d.txt", "dog\ncat\nsea_lion\ndog\nSea lion\n"))
    message = str(info.value)
    assert "dog / dog" in message and "sea_lion / Sea lion" in message and "\n" not in message


def test_prompt_name():
    assert prompt_name("golden_retriever") == "golden retriever"
    assert prompt_name("a__b") == "a  b"


def test_parse_domain_args_and_union_labels(tmp_path):
    _write(tmp_path / "a.txt", "airplane\ncar\n")
    _write(tmp_path / "b.txt", "Airplane\nboat\n")
    domains = parse_domain_args(
        [f"aircraft={tmp_path / 'a.txt'}", f"vehicles={tmp_path / 'b.txt'}"]
    )
    assert domains == [("aircraft", ["airplane", "car"]), ("vehicles", ["Airplane", "boat"])]
    assert union_labels(domains) == [
        DomainLabel("aircraft", "airplane"),
        DomainLabel("aircraft", "car"),
        DomainLabel("vehicles", "Airplane"),
        DomainLabel("vehicles", "boat"),
    ]
    assert shared_class_names(domains) == {"airplane": ["aircraft", "vehicles"]}


def test_domain_file_path_may_contain_equals(tmp_path):
    path = _write(tmp_path / "x=y.txt", "a\n")
    assert parse_domain_args([f"d={path}"]) == [("d", ["a"])]


@pytest.mark.parametrize(
    ("arg", "match"),
    [
        ("nofile", "NAME=FILE"),
        ("=c.txt", "NAME=FILE"),
        ("name=", "NAME=FILE"),
        ("bad name=c.txt", "only letters"),
    ],
)
def test_domain_syntax_errors(arg, match):
    with pytest.raises(ClassListError, match=match):
        parse_domain_args([arg])


def test_duplicate_domain_and_missing_file(tmp_path):
    path = _write(tmp_path / "c.txt", "a\n")
    with pytest.raises(ClassListError, match="more than once"):
        parse_domain_args([f"d={path}", f"d={path}"])
    with pytest.raises(ClassListError, match="not found"):
        parse_domain_args([f"d={tmp_path / 'missing.txt'}"])


# ---- text embeddings -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip():
    loading = pytest.importorskip("vlm_export.models.loading")
    return loading.load_clip("vlm-test-tiny", "none")


def _reference(model, tokenizer, classnames, templates):
    """Literal loop: one prompt at a time, as in the TDA/TCA clip_classifier."""
    import torch

    rows = []
    with torch.no_grad():
        for name in classnames:
            prompt_embeddings = []
            for template in templates:
                tokens = tokenizer([template.format(name.replace("_", " "))])
                embedding = model.encode_text(tokens)[0].double()
                prompt_embeddings.append(embedding / embedding.norm())
            mean = torch.stack(prompt_embeddings).mean(dim=0)
            rows.append((mean / mean.norm()).numpy())
    return np.stack(rows)


def test_encode_class_texts_matches_per_prompt_loop(tiny_clip):
    from vlm_export.export.graph.text_embeddings import encode_class_texts

    classnames = ["golden_retriever", "tabby cat", "sea_lion", "airplane", "pizza"]
    templates = load_templates("imagenet7")
    calls = []
    weights = encode_class_texts(
        tiny_clip.model,
        tiny_clip.tokenizer,
        classnames,
        templates,
        batch_size=4,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert weights.shape == (5, 32) and weights.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(weights, axis=1), 1.0, atol=1e-6)
    reference = _reference(tiny_clip.model, tiny_clip.tokenizer, classnames, templates)
    np.testing.assert_allclose(weights, reference, atol=1e-5)
    assert calls[-1] == (35, 35) and len(calls) == 9
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_encode_class_texts_batch_size_independent_and_deterministic(tiny_clip):
    from vlm_export.export.graph.text_embeddings import encode_class_texts

    classnames = ["dog", "cat", "bird"]
    templates = load_templates("imagenet80")
    args = (tiny_clip.model, tiny_clip.tokenizer, classnames, templates)
    big = encode_class_texts(*args)
    small = encode_class_texts(*args, batch_size=7)
    np.testing.assert_allclose(big, small, atol=1e-5)
    np.testing.assert_array_equal(encode_class_texts(*args), big)


def test_single_template_gives_the_normalised_prompt_embedding(tiny_clip):
    from vlm_export.export.graph.text_embeddings import build_prompts, encode_class_texts

    assert build_prompts(["sea_lion"], ("a photo of a {}.", "{}!")) == [
        "a photo of a sea lion.",
        "sea lion!",
    ]
    weights = encode_class_texts(tiny_clip.model, tiny_clip.tokenizer, ["sea_lion"], ("{}!",))
    reference = _reference(tiny_clip.model, tiny_clip.tokenizer, ["sea_lion"], ("{}!",))
    np.testing.assert_allclose(weights, reference, atol=1e-5)


def test_encode_class_texts_errors(tiny_clip):
    from vlm_export.export.graph.text_embeddings import TextEmbeddingError, encode_class_texts

    model, tokenizer = tiny_clip.model, tiny_clip.tokenizer
    with pytest.raises(TextEmbeddingError, match="no class names"):
        encode_class_texts(model, tokenizer, [], ("{}",))
    with pytest.raises(TemplateError, match="empty"):
        encode_class_texts(model, tokenizer, ["dog"], ())
    with pytest.raises(TextEmbeddingError, match="batch size"):
        encode_class_texts(model, tokenizer, ["dog"], ("{}",), batch_size=0)


def test_broken_text_tower_is_reported(tiny_clip):
    import torch

    from vlm_export.export.graph.text_embeddings import TextEmbeddingError, encode_class_texts

    class ZeroText(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
            return torch.zeros(tokens.shape[0], 8)

    with pytest.raises(TextEmbeddingError, match="'dog'"):
        encode_class_texts(ZeroText(), tiny_clip.tokenizer, ["dog"], ("{}",))


def test_shared_prefix_path_equals_each_prompt_alone(tiny_clip):
    """Every prompt's embedding from the cached-prefix path equals the same prompt run alone
    through the text tower: templates whose class comes first, whose prefix runs into the class
    word, that share prefixes with each other, and a class cut at the context."""
    import torch

    from vlm_export.export.graph.text_embeddings import (
        build_prompts,
        embed_with_shared_prefixes,
        shared_prefix_lengths,
    )
    from vlm_export.models.text_tower import TextTower

    classnames = ["cat", "golden_retriever", "Crème brûlée &amp; 東京", "x " * 90, "a"]
    templates = ["a photo of a {}.", "a photo of the {}.", "{}", "{} in the wild", "itap{}s"]
    prompts = build_prompts(classnames, templates)
    tokens = tiny_clip.tokenizer(prompts).numpy().astype(np.int64)
    group = np.arange(len(prompts)) % len(templates)
    prefix = shared_prefix_lengths(tokens, group, len(templates))
    assert prefix[0] == 5  # SOT a photo of a
    assert prefix[2] == 1  # the class comes first: SOT only
    tower = TextTower(tiny_clip.model).eval()
    with torch.no_grad():
        fast = embed_with_shared_prefixes(tower, tokens, group, len(templates), batch_size=6)
        # groups two at a time: three rounds of prefixes, each with its own rows
        chunked = embed_with_shared_prefixes(tower, tokens, group, len(templates), batch_size=2)
        alone = np.concatenate(
            [tower(torch.from_numpy(row[None, : row.argmax() + 1])).numpy() for row in tokens]
        )
    np.testing.assert_allclose(fast, alone, atol=2e-6)
    np.testing.assert_allclose(chunked, alone, atol=2e-6)


def test_encode_class_texts_end_of_text_inside_a_prompt(tiny_clip):
    """CLIP's tokenizer turns a literal "<end_of_text>" into the EOT id mid-prompt; open_clip
    pools at the first EOT, and so must the shared-prefix path (in the class name, before and
    after the template's placeholder, a class whose prompts equal another's, batch size 1)."""
    from vlm_export.export.graph.text_embeddings import encode_class_texts

    classnames = ["<end_of_text>", "x <end_of_text> y", "cat", "Cat ", "x " * 90]
    templates = ("{}", "a {} b", "<end_of_text> {}", "{} <end_of_text> tail")
    assert (tiny_clip.tokenizer(["a <end_of_text> b"])[0] == 49407).sum() == 2
    calls = []
    weights = encode_class_texts(
        tiny_clip.model,
        tiny_clip.tokenizer,
        classnames,
        templates,
        batch_size=1,
        progress=lambda done, total: calls.append((done, total)),
    )
    reference = _reference(tiny_clip.model, tiny_clip.tokenizer, classnames, templates)
    np.testing.assert_allclose(weights, reference, atol=1e-5)
    assert calls == [(done, 20) for done in range(1, 21)]
