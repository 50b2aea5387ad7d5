"""Decode speed of the ONNX decoder, pruned vs unpruned, with SmolVLM-256M's text shapes.

Builds a random-weight Llama decoder shaped like SmolVLM-256M's text model (hidden 576, 30
layers, 9 heads, 3 KV heads, FFN 1536, vocab 49152) and the same with 21 layers (pruned 30%),
through onnxruntime-genai's model builder exactly as `edgevlm export --target onnx` does, then
measures both in one process, interleaved (A B A B ...), with the reference loop of
`edgevlm.runtimes.ort_generate` (IOBinding, one shared KV buffer):
  prefill 512 tokens; decode 128 tokens with an empty cache; decode 128 tokens after 512.
Writes JSON with tok/s (best and median over repeats) and pruned/unpruned ratios. Ratios use
the best run of each: on a shared machine other work only ever slows a run down, so the
fastest run is the least disturbed estimate (medians are reported too).

  python benchmarks/bench_onnx_decoder.py --precision int4 --threads 2 -o bench_onnx.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
              intermediate_size=1536, vocab_size=49152, head_dim=64)
PRUNED_LAYERS = 21
QUANT_OF = {"fp32": "none", "int8": "int8", "int4": "q4"}


def build(layers: int, precision: str, work: Path, tokenizer_src: Path) -> Path:
    """A random SmolLM2-135M-shaped decoder with `layers` layers, built by the builder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgevlm.export.onnx_export.decoder import build_decoder

    torch.manual_seed(0)
    config = LlamaConfig(**{**SHAPES, "num_hidden_layers": layers}, rms_norm_eps=1e-5,
                         max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    text = work / f"text-{layers}"
    LlamaForCausalLM(config).save_pretrained(text)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tokenizer_src / name, text / name)
    start = time.perf_counter()
    built = build_decoder(text, work / f"onnx-{layers}-{precision}", work / "cache", QUANT_OF[precision])
    print(f"built {layers} layers {precision} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return built.model


def measure(decoder, prompt: int, new: int, rng) -> dict:
    """Seconds for a `prompt`-token prefill and for `new` decode steps after it."""
    hidden = SHAPES["hidden_size"]
    cache = decoder.cache(max_len=prompt + new + 1)
    embeds = rng.standard_normal((1, prompt, hidden), dtype=np.float32) * 0.02
    start = time.perf_counter()
    cache.run(embeds, None)
    prefill = time.perf_counter() - start
    step = rng.standard_normal((1, 1, hidden), dtype=np.float32) * 0.02
    start = time.perf_counter()
    for _ in range(new):
        cache.run(step, None)
    return {"prefill_s": prefill, "decode_s": time.perf_counter() - start}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="int4", choices=sorted(QUANT_OF), nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("-o", "--output", type=Path, default=Path("bench_onnx_decoder.json"))
    args = parser.parse_args(argv)
    precisions = args.precision if isinstance(args.precision, list) else [args.precision]

    import onnxruntime

    from edgevlm.loader import materialize_tiny
    from edgevlm.runtimes.ort_generate import Decoder

    tokenizer_src = materialize_tiny("tiny:smolvlm")  # any tokenizer: the builder only reads ids
    rng = np.random.default_rng(0)
    result = {"shapes": SHAPES, "pruned_layers": PRUNED_LAYERS, "threads": args.threads,
              "repeats": args.repeats, "prompt_tokens": args.prompt, "new_tokens": args.new,
              "onnxruntime": onnxruntime.__version__, "machine": platform.machine(),
              "processor": platform.processor(), "results": {}}
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        work = Path(tmp)
        for precision in precisions:
            paths = {layers: build(layers, precision, work, tokenizer_src)
                     for layers in (SHAPES["num_hidden_layers"], PRUNED_LAYERS)}

            def session(layers, paths=paths):
                # One live session at a time, with onnxruntime's default thread spinning:
                # a second live session's spinning threads steal the cores (measured: the
                # other model looked 2x slower), and turning spinning off costs ~30% decode.
                return Decoder(paths[layers], kv_heads=SHAPES["num_key_value_heads"],
                               head_dim=SHAPES["head_dim"], threads=args.threads)

            runs = {layers: {"prefill": [], "decode_empty": [], "decode_cached": []} for layers in paths}
            for _ in range(args.repeats):
                for layers in paths:  # interleaved: A B A B ...
                    dec = session(layers)
                    measure(dec, 16, 4, rng)  # warm-up, not recorded
                    cached = measure(dec, args.prompt, args.new, rng)
                    empty = measure(dec, 1, args.new, rng)
                    del dec
                    runs[layers]["prefill"].append(args.prompt / cached["prefill_s"])
                    runs[layers]["decode_cached"].append(args.new / cached["decode_s"])
                    runs[layers]["decode_empty"].append(args.new / empty["decode_s"])
            summary = {str(layers): {f"{k}_tok_s": max(v) for k, v in r.items()}
                       for layers, r in runs.items()}
            medians = {str(layers): {f"{k}_tok_s": statistics.median(v) for k, v in r.items()}
                       for layers, r in runs.items()}
            full, pruned = summary[str(SHAPES["num_hidden_layers"])], summary[str(PRUNED_LAYERS)]
            ratios = {k.replace("_tok_s", ""): pruned[k] / full[k] for k in full}
            target = 0.95 * SHAPES["num_hidden_layers"] / PRUNED_LAYERS
            result["results"][precision] = {
                "tok_s": summary, "median_tok_s": medians, "pruned_over_unpruned": ratios,
                "target_ratio": target, "meets_target": {k: v >= target for k, v in ratios.items()},
                "samples_tok_s": {str(layers): r for layers, r in runs.items()},
            }
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({p: {"tok_s": r["tok_s"], "ratios": r["pruned_over_unpruned"]}
                      for p, r in result["results"].items()}, indent=2))
    return result


if __name__ == "__main__":
    main()
