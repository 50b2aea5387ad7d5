"""Issue 11, part 2: --max-image-tokens through each family's own knob."""

from __future__ import annotations

import shutil

import pytest

from edgevlm.errors import UsageError
from edgevlm.loader import materialize_tiny
from edgevlm.runtimes.image_budget import image_cost, write_budget

# tiny:smolvlm has 4 tokens per tile; a 640x480 picture is 2x2 tiles + the global image.
# tiny:qwen2-vl: 54 tokens for 640x480 at its max_pixels.
CASES = [("smolvlm", None, 20, 5), ("smolvlm", 19, 4, 1), ("smolvlm", 20, 20, 5),
         ("qwen2-vl", None, 54, 1), ("qwen2-vl", 16, 12, 1), ("qwen2-vl", 1000, 54, 1)]


@pytest.mark.parametrize("family, budget, tokens, tiles", CASES)
def test_budget_changes_image_tokens_as_stated(family, budget, tokens, tiles):
    cost = image_cost(materialize_tiny(f"tiny:{family}"), 640, 480, budget)
    assert (cost["image_tokens"], cost["tiles"]) == (tokens, tiles)
    assert budget is None or cost["image_tokens"] <= budget


@pytest.mark.parametrize("family, budget", [("smolvlm", 19), ("qwen2-vl", 16)])
def test_budget_written_for_export_is_what_transformers_does(family, budget, tmp_path):
    """The budget written into an export's processor config gives the same image tokens in
    the Hugging Face processor as in edgevlm's runners."""
    from PIL import Image

    from edgevlm.adapters import adapter_for_config
    from edgevlm.processors import load_processor
    from edgevlm.prompting import chat_text

    folder = tmp_path / "ckpt"
    shutil.copytree(materialize_tiny(f"tiny:{family}"), folder)
    write_budget(folder, budget)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    adapter = adapter_for_config(config)
    processor = load_processor(folder, adapter)
    batch = processor(text=[chat_text(processor, "Describe.")],
                      images=[[Image.new("RGB", (640, 480), (127, 127, 127))]], return_tensors="pt")
    hf_tokens = int(adapter.visual_mask(batch["input_ids"], config).sum())
    assert hf_tokens == image_cost(folder, 640, 480)["image_tokens"] <= budget


@pytest.mark.parametrize("family", ["gemma3", "llava", "smolvlm"])
def test_budget_below_the_minimum_is_refused(family):
    with pytest.raises(UsageError, match="below the"):
        image_cost(materialize_tiny(f"tiny:{family}"), 640, 480, 3)
