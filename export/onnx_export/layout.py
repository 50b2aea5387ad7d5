"""The transformers.js / onnx-community folder layout: config + tokenizer + processor files at
the top, graphs under onnx/ with `_quantized` (dynamic INT8) / `_q4` (4-bit) suffixes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TWO_GB = 2 << 30
SUFFIX = {"none": "", "int8": "_quantized", "q4": "_q4"}
COPY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
              "added_tokens.json", "processor_config.json", "preprocessor_config.json",
              "chat_template.jinja", "chat_template.json")


def graph_name(stem: str, quant: str = "none") -> str:
    return f"{stem}{SUFFIX[quant]}.onnx"


def copy_model_files(model_dir: Path, dest: Path, vlm) -> list[Path]:
    """Config, generation config, tokenizer, processor and chat template files."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name in COPY_FILES:
        if (Path(model_dir) / name).exists():
            shutil.copy2(Path(model_dir) / name, dest / name)
            written.append(dest / name)
    if not (dest / "preprocessor_config.json").exists():
        # transformers.js reads the image processor from its own file.
        image_processor = getattr(vlm.processor, "image_processor", None)
        if image_processor is not None:
            image_processor.to_json_file(str(dest / "preprocessor_config.json"))
            written.append(dest / "preprocessor_config.json")
    return written


def place_graph(src: Path, dest: Path) -> list[Path]:
    """Move an ONNX graph into place, inlining its weights below 2 GB; above, weights go to
    `<name>.onnx_data` (transformers.js' name) and the references are rewritten."""
    import onnx

    model = onnx.load(str(src), load_external_data=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if _fits(model):
        onnx.save(model, str(dest))
        return [dest]
    data_name = dest.name + "_data"
    onnx.save(model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
              location=data_name, size_threshold=1024)
    return [dest, dest.parent / data_name]


def _fits(model) -> bool:
    total = sum(len(t.raw_data) for t in model.graph.initializer)
    return total < TWO_GB - (64 << 20)


def write_genai_config(src: Path, dest: Path, decoder_file: str) -> Path:
    """Keep onnxruntime-genai's config, pointing at the renamed decoder."""
    config = json.loads(Path(src).read_text())
    decoder = config.get("model", {}).get("decoder", {})
    if "filename" in decoder:
        decoder["filename"] = f"onnx/{decoder_file}"
    dest.write_text(json.dumps(config, indent=4) + "\n")
    return dest
