"""The transformers.js / onnx-community folder layout: config + tokenizer + processor files at
the top, graphs under onnx/ with `_quantized` (dynamic INT8) / `_q4` (4-bit) suffixes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgevlm.runtimes import families

TWO_GB = 2 << 30
COPY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
              "added_tokens.json", "processor_config.json", "preprocessor_config.json",
              "chat_template.jinja", "chat_template.json")


graph_name = families.onnx_graph  # (stem, quant) -> file name with the quantization suffix


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
    write_client_settings(dest, vlm)
    return written


def write_client_settings(dest: Path, vlm) -> None:
    """What transformers.js 4 reads beyond a transformers-5 save: `AutoProcessor` picks the
    processor from `processor_class` in preprocessor_config.json, and the tokenizer's chat
    template from tokenizer_config.json (a transformers-5 save keeps it in chat_template.jinja
    only); its Qwen2-VL reads the text settings at the top of config.json (the hub's flat form)."""
    _update_json(dest / "preprocessor_config.json",
                 {"processor_class": type(vlm.processor).__name__}, keep=True)
    processor = dest / "processor_config.json"
    if processor.exists():
        settings = json.loads(processor.read_text())
        if settings.get("vision_feature_select_strategy") == "default":
            # transformers.js' LlavaProcessor counts patches + num_additional_image_tokens and
            # ignores the strategy, whose "default" drops the CLS feature: say it in the count.
            _update_json(processor, {"num_additional_image_tokens":
                                     int(settings.get("num_additional_image_tokens", 0)) - 1,
                                     "vision_feature_select_strategy": "full"}, keep=False)
    template = _chat_template(dest)
    if template is not None:
        _update_json(dest / "tokenizer_config.json", {"chat_template": template}, keep=True)
    config = json.loads((dest / "config.json").read_text())
    if config.get("model_type") == "qwen2_vl" and "text_config" in config:
        flat = {k: v for k, v in config["text_config"].items()
                if k not in ("model_type", "architectures", "dtype")}
        _update_json(dest / "config.json", flat, keep=False)


def _chat_template(folder: Path):
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").exists():
        return json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    return None


def _update_json(path: Path, values: dict, *, keep: bool) -> None:
    """Set `values` in a JSON file (`keep`: values already there win)."""
    if not path.exists():
        return
    data = json.loads(path.read_text())
    data.update({k: v for k, v in values.items() if not (keep and k in data)})
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


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
