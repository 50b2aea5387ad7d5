"""Issue 2: tiny models, loader, adapters, processors — for every registered family."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, load_tiny

from edgevlm.adapters import ADAPTERS
from edgevlm.errors import ModelNotFoundError, UnsupportedModelError, UsageError
from edgevlm.loader import load, materialize_tiny
from edgevlm.prompting import encode, model_inputs
from edgevlm.tiny import build_tiny, parse_tiny


def test_every_adapter_has_a_tiny_model_and_is_tested():
    assert sorted(ADAPTERS.names()) == sorted(FAMILIES)


def test_build_save_reload_identical(family, calib):
    """In-memory build -> save -> load gives the same processor tensors and logits."""
    model, processor = build_tiny(family)
    loaded = load_tiny(family)
    batch_fresh = encode(type(loaded)(model=model, processor=processor, adapter=loaded.adapter,
                                      name="fresh", path=loaded.path), calib.scoring[:2])
    batch_loaded = encode(loaded, calib.scoring[:2])
    assert batch_fresh.keys() == batch_loaded.keys()
    for key in batch_fresh:
        assert torch.equal(batch_fresh[key], batch_loaded[key]), key
    with torch.no_grad():
        a = model(**model_inputs(batch_fresh)).logits
        b = loaded.model(**model_inputs(batch_loaded)).logits
    assert torch.equal(a, b)


def test_adapter_paths_and_forward_with_image(tiny, calib):
    adapter, model, config = tiny.adapter, tiny.model, tiny.config
    layers = adapter.layers(model)
    assert len(layers) == adapter.num_layers(config) >= 6
    for getter in (adapter.vision, adapter.projector_module, adapter.final_norm,
                   adapter.embed_tokens, adapter.lm_head_module):
        assert isinstance(getter(model), torch.nn.Module)
    batch = encode(tiny, calib.scoring[:2])
    visual = adapter.visual_mask(batch["input_ids"], config)
    assert visual.any(dim=1).all(), "every sample carries image tokens"
    with torch.no_grad():
        out = model(**model_inputs(batch), output_hidden_states=True)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(out.logits).all()
    # The image must influence the output: features are not all zero.
    with torch.no_grad():
        other_images = encode(tiny, calib.scoring[:2])
        # Negated, not zeroed: SmolVLM treats all-zero tiles as padding.
        other_images["pixel_values"] = -other_images["pixel_values"]
        other = model(**model_inputs(other_images)).logits
    assert not torch.allclose(out.logits, other)


def test_visual_mask_is_where_the_model_scatters_image_features(tiny, calib, monkeypatch):
    """The visual-token mask that scorers use (batch.visual, from the adapter) is exactly
    where the model's own forward scatters image features into the input embeddings: every
    family merges them with Tensor.masked_scatter, which is spied on here. Two samples of
    different lengths, so one row is left-padded."""
    from edgevlm.scoring.hooks import forward, iter_batches

    ids = tiny.adapter.image_token_ids(tiny.config)
    assert ids and all(i < tiny.config.get_text_config().vocab_size for i in ids)
    batch = next(iter_batches(tiny, calib.scoring[:2], 2))
    scattered = []
    real_scatter = torch.Tensor.masked_scatter

    def spy(self, mask, source):
        if self.dim() == 3 and self.shape[:2] == batch.real.shape:
            scattered.append(mask.expand_as(self).any(-1))
        return real_scatter(self, mask, source)

    monkeypatch.setattr(torch.Tensor, "masked_scatter", spy)
    with torch.no_grad():
        forward(tiny, batch)
    assert len(scattered) == 1  # one merge of image features into the sequence
    assert scattered[0].any(dim=1).all()
    assert torch.equal(batch.visual, scattered[0])
    assert torch.equal(tiny.adapter.visual_mask(batch.inputs["input_ids"], tiny.config).bool(),
                       scattered[0])


def test_checkpoint_looks_like_the_hub(family):
    from safetensors import safe_open

    path = materialize_tiny(f"tiny:{family}")
    with safe_open(path / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    if family in ("llava", "gemma3"):
        assert any(k.startswith("vision_tower.vision_model.") for k in keys)
        assert not any(k.startswith("vision_tower.embeddings") for k in keys)
    for name in ("config.json", "tokenizer.json", "chat_template.jinja", "processor_config.json"):
        assert (path / name).exists(), name
    assert "{%" in (path / "chat_template.jinja").read_text()


def test_k256_variant_has_quantizable_rows():
    model, _ = build_tiny("smolvlm-k256")
    text = model.config.get_text_config()
    assert text.hidden_size % 256 == 0 and text.intermediate_size % 256 == 0


def test_gemma3_projector_is_not_zero():
    model, _ = build_tiny("gemma3")
    assert model.model.multi_modal_projector.mm_input_projection_weight.abs().sum() > 0


def test_tiny_names():
    assert parse_tiny("tiny:Qwen2_5-VL-k256") == ("qwen2.5-vl", "k256")
    with pytest.raises(UsageError, match="tiny:smolvlm"):
        parse_tiny("tiny:nope")


# ------------------------------------------------------------------- loader bad inputs
def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load(str(tmp_path / "nothing"))


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(UnsupportedModelError) as info:
        load(str(tmp_path))
    assert "bert" in str(info.value) and "smolvlm" in str(info.value)


def test_missing_processor_files(tmp_path):
    import shutil

    src = materialize_tiny("tiny:llava")
    for f in ("config.json", "model.safetensors"):
        shutil.copy(src / f, tmp_path / f)
    with pytest.raises(ModelNotFoundError, match="processor files"):
        load(str(tmp_path))


def test_hub_id_offline_names_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as info:
        load("HuggingFaceTB/SmolVLM-256M-Instruct")
    assert "tiny:smolvlm" in str(info.value)


def test_local_folder_loads_like_tiny(tmp_path):
    import shutil

    dst = tmp_path / "my model"
    shutil.copytree(materialize_tiny("tiny:smolvlm"), dst)
    vlm = load(str(dst))
    assert vlm.adapter.family == "smolvlm" and vlm.path == dst


# Published parameter counts of the real models (billions).
PUBLISHED = {"smolvlm-256m": 0.256, "smolvlm-500m": 0.507, "qwen2-vl-2b": 2.21,
             "qwen2.5-vl-3b": 3.75, "gemma3-4b": 4.30, "llava-1.5-7b": 7.06}


def test_random_presets_have_the_real_architecture_sizes():
    from edgevlm.tiny.presets import preset_names

    assert sorted(preset_names()) == sorted(PUBLISHED)
    for name, billions in PUBLISHED.items():
        with torch.device("meta"):  # shapes only
            model, processor = build_tiny(f"random:{name}")
        count = sum(p.numel() for p in model.parameters()) / 1e9
        assert count == pytest.approx(billions, rel=0.01), name
        assert processor.tokenizer.chat_template


def test_random_preset_runs_through_the_loader(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEVLM_CACHE", str(tmp_path))
    vlm = load("random:smolvlm-256m")
    text = vlm.config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (576, 30, 49280)
