"""Text side: templates, synonym splitting, prompt-ensembled embeddings and their caches."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lposs_lab.config import PixelConfig
from lposs_lab.text import IMAGENET_TEMPLATES, TextEmbedder, split_synonyms, text_embeddings

# the benchmark facts shipped with the lab hold the 80 templates of the published code as plain data
BENCHMARKS_JSON = Path(__file__).resolve().parents[2] / "lposs_lab" / "lab" / "data" / "benchmarks.json"


class CountingVLM:
    """Wraps a VLM: counts ``encode_text`` calls and prompts; ``weights_id`` can be changed."""

    def __init__(self, vlm: torch.nn.Module, weights_id: str | None = None) -> None:
        self.vlm = vlm
        self.weights_id = weights_id or vlm.weights_id
        self.calls = 0
        self.prompts = 0

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        self.calls += 1
        self.prompts += len(texts)
        return self.vlm.encode_text(texts)


@pytest.fixture(scope="module")
def vlm(tiny_encoders) -> torch.nn.Module:
    return tiny_encoders[1]


def _direct(vlm: torch.nn.Module, synonym: str, templates: Sequence[str]) -> torch.Tensor:
    emb = F.normalize(vlm.encode_text([t.format(synonym) for t in templates]), dim=-1)
    return F.normalize(emb.mean(0), dim=-1)


def test_imagenet_templates() -> None:
    assert isinstance(IMAGENET_TEMPLATES, tuple) and len(IMAGENET_TEMPLATES) == 80
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert list(IMAGENET_TEMPLATES) == json.loads(BENCHMARKS_JSON.read_text())["imagenet_templates"]


def test_split_synonyms() -> None:
    syn, owner = split_synonyms(["sky; wall;tree", "cat", " dog ;; ", "person;"])
    assert syn == ["sky", "wall", "tree", "cat", "dog", "person"]
    assert owner == [0, 0, 0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"class 1 \(' ; '\) has no non-empty name"):
        split_synonyms(["cat", " ; "])
    with pytest.raises(ValueError, match="not a single string"):
        split_synonyms("cat;dog")
    with pytest.raises(ValueError, match="empty"):
        split_synonyms([])


def test_embeddings_equal_direct_computation(vlm) -> None:
    synonyms = ["cat", "traffic light"]
    out = TextEmbedder()(vlm, synonyms)
    assert out.shape == (2, vlm.embed_dim) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
    for row, synonym in zip(out, synonyms, strict=True):
        torch.testing.assert_close(row, _direct(vlm, synonym, IMAGENET_TEMPLATES), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out[0], out[1])


def test_memory_cache_hits_partial_misses_and_weights_id(vlm) -> None:
    embedder = TextEmbedder()
    counting = CountingVLM(vlm)
    templates = IMAGENET_TEMPLATES[:7]
    first = embedder(counting, ["cat", "dog"], templates)
    assert (counting.calls, counting.prompts) == (1, 14)
    again = embedder(counting, ["dog", "cat"], templates)
    assert counting.calls == 1  # no recomputation
    assert torch.equal(again, first.flip(0))
    embedder(counting, ["cat", "bird"], templates)
    assert (counting.calls, counting.prompts) == (2, 21)  # only "bird" encoded
    other_templates = embedder(counting, ["cat"], IMAGENET_TEMPLATES[:3])
    assert counting.prompts == 24
    torch.testing.assert_close(other_templates[0], _direct(vlm, "cat", IMAGENET_TEMPLATES[:3]))
    renamed = CountingVLM(vlm, weights_id="other-weights")
    embedder(renamed, ["cat", "dog"], templates)
    assert (renamed.calls, renamed.prompts) == (1, 14)  # different weights id -> recomputed
    assert embedder.encoded == 2 + 1 + 1 + 2


def test_disk_cache_roundtrip_and_corruption(vlm, tmp_path) -> None:
    templates = IMAGENET_TEMPLATES[:5]
    first_vlm = CountingVLM(vlm)
    a = TextEmbedder(cache_dir=tmp_path)(first_vlm, ["cat", "dog"], templates)
    files = list(tmp_path.glob("text_*.pt"))
    assert len(files) == 1 and not list(tmp_path.glob(".*.tmp"))
    fresh = CountingVLM(vlm)
    b = TextEmbedder(cache_dir=tmp_path)(fresh, ["cat", "dog"], templates)
    assert fresh.calls == 0 and torch.equal(a, b)
    files[0].write_bytes(b"not a torch file")
    again = CountingVLM(vlm)
    c = TextEmbedder(cache_dir=tmp_path)(again, ["cat", "dog"], templates)
    assert again.calls == 1
    torch.testing.assert_close(c, a)
    assert torch.load(files[0], weights_only=True)["synonyms"] == ["cat", "dog"]  # rewritten


def test_text_embeddings_function_caches_per_process(vlm) -> None:
    counting = CountingVLM(vlm, weights_id="fn-cache-test")
    a = text_embeddings(counting, ["zebra"], IMAGENET_TEMPLATES[:4])
    b = text_embeddings(counting, ["zebra"], IMAGENET_TEMPLATES[:4])
    assert counting.calls == 1 and torch.equal(a, b)


def test_bad_inputs_rejected(vlm) -> None:
    embedder = TextEmbedder()
    with pytest.raises(ValueError, match="non-empty strings"):
        embedder(vlm, ["cat", " "])
    with pytest.raises(ValueError, match="placeholder"):
        embedder(vlm, ["cat"], ["a photo"])


def test_predictor_keeps_each_vocabulary_on_disk(vlm, monkeypatch, tmp_path) -> None:
    from model_fixtures import save_safetensors

    from lposs_lab import LPOSS, LPOSSConfig
    from lposs_lab.models import create_vm
    from lposs_lab.models.tiny import TINY_CLIP_ARCH
    from lposs_lab.text import default_text_cache_dir

    vm = create_vm("tiny_random")
    model = LPOSS(vm, vlm, LPOSSConfig(device="cpu"), text_cache_dir=tmp_path / "text")
    model.set_classes(["cat", "dog;puppy"])
    files = list((tmp_path / "text").glob("text_*.pt"))
    assert len(files) == 1
    blob = torch.load(files[0], weights_only=True)
    assert blob["synonyms"] == ["cat", "dog", "puppy"] and blob["weights_id"] == vlm.weights_id
    torch.testing.assert_close(blob["embeddings"][2], _direct(vlm, "puppy", IMAGENET_TEMPLATES))
    model.set_classes(["sky"])  # another vocabulary, another file
    assert len(list((tmp_path / "text").glob("text_*.pt"))) == 2

    # from_config: "auto" caches on disk for real weights only (random-init VLMs are cheap to encode)
    monkeypatch.setenv("LPOSS_TEXT_CACHE_DIR", str(tmp_path / "auto"))
    assert default_text_cache_dir() == tmp_path / "auto"
    cfg = LPOSSConfig(vm="tiny_random", vlm="tiny_random", device="cpu", pixel=PixelConfig(enabled=False))
    assert LPOSS.from_config(cfg).text_cache_dir is None
    ckpt = save_safetensors(vlm.model, tmp_path / "clip.safetensors")
    from lposs_lab.models import registry

    monkeypatch.setitem(
        registry.VLM_MODELS,
        "tiny_file",
        registry.OpenClipVLM("tiny_file", "ViT-B-16", None, base_arch=TINY_CLIP_ARCH),
    )
    loaded = LPOSS.from_config(cfg.replace(vlm="tiny_file", vlm_pretrained=str(ckpt)))
    assert loaded.text_cache_dir == tmp_path / "auto"
    loaded.set_classes(["cat"])
    assert len(list((tmp_path / "auto").glob("text_*.pt"))) == 1
    assert LPOSS.from_config(cfg, text_cache_dir=None).text_cache_dir is None
