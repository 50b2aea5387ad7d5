"""The decoder half shared by the families: llama / qwen2 / qwen2vl / gemma3 text GGUFs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgevlm.errors import UsageError
from edgevlm.export.gguf_export.tokenizer import add_tokenizer
from edgevlm.export.gguf_export.writer import TensorJob


@dataclass
class TextOptions:
    arch: str  # gguf arch name: llama, qwen2, qwen2vl, gemma3
    permute_qk: bool = False  # llama.cpp's llama arch expects q/k rows in its rotary order
    norm_plus_one: bool = False  # Gemma RMSNorm scales by (1 + w); llama.cpp by w


def rope_theta(tcfg: dict, layer_type: str | None = None) -> float:
    params = tcfg.get("rope_parameters") or {}
    if layer_type and layer_type in params:
        params = params[layer_type]
    return float(params.get("rope_theta", tcfg.get("rope_theta", 10000.0)))


def head_dim(tcfg: dict) -> int:
    return int(tcfg.get("head_dim") or tcfg["hidden_size"] // tcfg["num_attention_heads"])


def permute_rows(w, n_head: int):
    """Reorder q/k projection rows from HF's rotate-half layout to llama.cpp's interleaved
    rotary layout (per head: first halves and second halves interleaved)."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def text_jobs(src, tcfg: dict, opts: TextOptions) -> list[TensorJob]:
    """Tensor jobs for the decoder. `src` names are canonical: model.embed_tokens.weight,
    model.layers.N...., model.norm.weight, lm_head.weight."""
    from gguf import MODEL_ARCH_NAMES, TensorNameMap

    n_layers = int(tcfg["num_hidden_layers"])
    arch_id = next(a for a, n in MODEL_ARCH_NAMES.items() if n == opts.arch)
    names = TensorNameMap(arch_id, n_layers)
    present = sorted({int(n.split(".")[2]) for n in src.names() if n.startswith("model.layers.")})
    if present != list(range(n_layers)):
        raise UsageError(
            f"checkpoint has decoder layers {present} but config says num_hidden_layers={n_layers}",
            "the checkpoint folder is inconsistent; re-save it with save_pretrained")
    n_head, n_kv = int(tcfg["num_attention_heads"]), int(tcfg["num_key_value_heads"])

    def loader(name: str, transform=None):
        def load():
            data = src.get(name)
            return transform(data) if transform else data
        return load

    jobs = []
    for name in src.names():
        if name == "lm_head.weight" and tcfg.get("tie_word_embeddings"):
            continue
        base, _, suffix = name.rpartition(".")
        gguf_base = names.get_name(base)
        if gguf_base is None:
            raise UsageError(f"no GGUF name for text tensor '{name}'",
                             "this checkpoint has weights the writer does not know")
        transform = None
        if opts.permute_qk and base.endswith("self_attn.q_proj"):
            transform = lambda w: permute_rows(w, n_head)  # noqa: E731
        elif opts.permute_qk and base.endswith("self_attn.k_proj"):
            transform = lambda w: permute_rows(w, n_kv)  # noqa: E731
        elif opts.norm_plus_one and base.endswith("norm") and suffix == "weight":
            transform = lambda w: w + 1.0  # noqa: E731
        shape = src.shape(name)
        jobs.append(TensorJob(f"{gguf_base}.{suffix}", shape, loader(name, transform),
                              keep_f32=len(shape) == 1))
    order = {"token_embd": -1, "output_norm": 10**6, "output": 10**6 + 1}
    jobs.sort(key=lambda j: order.get(j.name.split(".")[0], int(j.name.split(".")[1])
                                      if j.name.startswith("blk.") else 0))
    return jobs


def text_metadata(writer, folder: Path, tcfg: dict, *, name: str, ftype: int) -> dict:
    """The keys every decoder arch shares, plus the tokenizer; returns the tokenizer summary."""
    hd = head_dim(tcfg)
    writer.add_name(name)
    writer.add_context_length(int(tcfg.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(int(tcfg["hidden_size"]))
    writer.add_block_count(int(tcfg["num_hidden_layers"]))
    writer.add_feed_forward_length(int(tcfg["intermediate_size"]))
    writer.add_head_count(int(tcfg["num_attention_heads"]))
    writer.add_head_count_kv(int(tcfg["num_key_value_heads"]))
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_rope_dimension_count(hd)
    writer.add_layer_norm_rms_eps(float(tcfg.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(tcfg["vocab_size"]))
    writer.add_file_type(ftype)
    return add_tokenizer(writer, folder, int(tcfg["vocab_size"]))
