"""Pruned vs unpruned exports of one model through both runners, interleaved in one run.

For each runtime and quantization: prefill and decode tokens/s of the pruned and the
unpruned export (pruned/unpruned ratio), next to the ideal ratio from the decoder's
per-token FLOPs (prefill) and weight bytes (decode); and the runner overhead: the bare
decode loop against `edgevlm bench`'s decode on the same export.

    python benchmarks/bench_runners.py --model random:smolvlm-256m --ratio 0.3 -o results/runners.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from edgevlm.devices import get_profile
from edgevlm.runtimes.bench import BenchConfig, bench_image, make_runner, run_once

# (target, quant) pairs; K-quants need 256-multiples, SmolVLM-256M's hidden is 576.
VARIANTS = [("gguf", "q8_0"), ("gguf", "q4_0"), ("onnx", "int8"), ("onnx", "q4")]


def make_exports(model: str, ratio: float, root: Path, variants) -> dict:
    """{(pruned?, target, quant): export folder}, through the same pipeline as the CLI."""
    from edgevlm import pipeline
    from edgevlm.loader import load, resolve
    from edgevlm.plan import layers_to_drop

    base = load(model)
    n_total = base.adapter.num_layers(base.config)
    n_drop = layers_to_drop(n_total, ratio, None)
    calib = pipeline.calibration("builtin:4")
    scores = pipeline.score_model(base, calib, "bi")
    plan = pipeline.plan_for(base, scores, ratio=ratio)
    pruned_dir = pipeline.prune_and_save(base, plan, root / "pruned-ckpt")
    del base
    full_dir = resolve(model)
    out = {}
    for pruned, model_dir in ((False, full_dir), (True, pruned_dir)):
        for target, quant in variants:
            folder = root / f"{'pruned' if pruned else 'full'}-{target}-{quant}"
            extra = {"name": folder.name} if target == "gguf" else {}
            pipeline.export_target(target, model_dir, folder, quant=quant, plan=None,
                                   base_model=model, verify=False, samples=None,
                                   progress=False, **extra)
            out[(pruned, target, quant)] = folder
    return out, n_total, n_drop


def ideal_ratios(model: str, n_total: int, n_drop: int) -> dict:
    """Pruned/unpruned speed if time were proportional to decoder work per token:
    FLOPs (~2 x parameters touched) for prefill, weight bytes read for decode. Embedding
    lookups are free; the lm_head is paid once per token in both."""
    from transformers import AutoConfig

    from edgevlm.loader import resolve

    text = AutoConfig.from_pretrained(resolve(model)).get_text_config()
    h, f = text.hidden_size, text.intermediate_size
    heads, kv = text.num_attention_heads, text.num_key_value_heads
    d = getattr(text, "head_dim", None) or h // heads
    per_layer = h * d * (heads + 2 * kv) + heads * d * h + 3 * h * f
    lm_head = h * text.vocab_size
    full = n_total * per_layer + lm_head
    pruned = (n_total - n_drop) * per_layer + lm_head
    return {"layers": [n_total, n_total - n_drop], "decoder_params_per_token": [full, pruned],
            "ideal_speedup": full / pruned, "layer_ratio": n_total / (n_total - n_drop)}


def bare_decode_tok_s(runner, image, n: int) -> float:
    """Decode speed of the runtime itself: greedy argmax steps, no streaming, no timing per
    token, no sampling code."""
    import numpy as np

    if runner.target == "onnx":
        inputs = runner.pre(image, "Describe this image in detail.")
        state, logits = runner.vlm.prefill(inputs, n + 1)
        start = time.perf_counter()
        for _ in range(n):
            logits = runner.vlm.step(state, int(np.argmax(logits)))
        return n / (time.perf_counter() - start)
    decoder, _, _, _ = runner.prefill(image, "Describe this image in detail.")
    logits = decoder.last_logits()
    start = time.perf_counter()
    for _ in range(n):
        decoder.tokens([int(np.argmax(logits))])
        logits = decoder.last_logits()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:smolvlm-256m")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", nargs="*", default=None, help="e.g. gguf:q4_0 onnx:q4")
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/runners.json"))
    args = parser.parse_args()
    variants = [v for v in VARIANTS if not args.only or f"{v[0]}:{v[1]}" in args.only]
    profile = get_profile("laptop-x86")
    config = BenchConfig(runs=args.runs, warmup=1, gen_tokens=args.gen_tokens)
    image = bench_image(config.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        exports, n_total, n_drop = make_exports(args.model, args.ratio, Path(tmp), variants)
        results = {}
        for target, quant in variants:
            runners = {}
            for pruned in (False, True):
                runner, _, _ = make_runner(exports[(pruned, target, quant)], profile,
                                           threads=args.threads)
                runner.load()
                run_once(runner, image, config)  # warm-up
                runners[pruned] = runner
            runs = {False: [], True: []}
            bare = {False: [], True: []}
            # Interleaved: pruned and unpruned, runner and bare loop alternate in every round,
            # so the machine's noise hits each alike and the overhead is a per-round ratio.
            for _ in range(args.runs):
                for pruned, runner in runners.items():
                    runs[pruned].append(run_once(runner, image, config))
                    bare[pruned].append(bare_decode_tok_s(runner, image, args.gen_tokens))
            entry = {}
            for pruned, label in ((False, "unpruned"), (True, "pruned")):
                entry[label] = {k: statistics.median(r[k] for r in runs[pruned])
                                for k in ("prefill_tok_s", "decode_tok_s", "ttft_ms", "image_ms")}
                entry[label]["bare_decode_tok_s"] = statistics.median(bare[pruned])
                overheads = [1 - r["decode_tok_s"] / b for r, b in zip(runs[pruned], bare[pruned], strict=True)]
                entry[label]["runner_overhead"] = statistics.median(overheads)
                entry[label]["runner_overhead_range"] = [min(overheads), max(overheads)]
                entry[label]["prompt_tokens"] = runs[pruned][0]["prompt_tokens"]
            for key in ("prefill_tok_s", "decode_tok_s"):
                entry[f"{key}_ratio"] = entry["pruned"][key] / entry["unpruned"][key]
            results[f"{target}:{quant}"] = entry
            for runner in runners.values():
                runner.close()
            print(json.dumps({f"{target}:{quant}": entry}, indent=1), flush=True)
    payload = {"model": args.model, "ratio": args.ratio, "runs": args.runs,
               "gen_tokens": args.gen_tokens, "ideal": ideal_ratios(args.model, n_total, n_drop),
               "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
