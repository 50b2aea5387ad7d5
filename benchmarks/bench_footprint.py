"""Memory footprint and decode speed of onnxruntime and llama.cpp exports of one model, pruned
and unpruned, against the device's roofline.

For each export (onnx q4/int8, gguf q4_0/q8_0), in its own process (so its memory is its own):
peak RSS per phase (load, image, prefill, decode) of a full `edgevlm bench` generation with a
640x480 image; decode tokens/s after 512 and 2,048 cached tokens (the runner's own step in a
greedy loop); decode as % of the memory-bandwidth roofline and prefill / image encode as % of
peak compute. Repetitions are interleaved across the exports of one group (A B C D A B C D).

Exports are made once (`--no-verify`: benchmark speed and memory, not parity) under --work and
reused. The roofline uses --bandwidth-gbs / --peak-gflops when given (e.g. measured with
`edgevlm devices --measure`), else the profile's figures.

    python benchmarks/bench_footprint.py --model random:smolvlm-256m --work /tmp/fp \\
        -o benchmarks/results/footprint-smolvlm-256m.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

from edgevlm.devices import get_profile
from edgevlm.runtimes.bench import BenchConfig, Workers, result_of

# "q4+vision-int8": the q4 decoder with `--vision-quant int8` (llama.cpp's mmproj is f16).
VARIANTS = [("onnx", "q4"), ("onnx", "q4+vision-int8"), ("onnx", "int8"), ("gguf", "q4_0"),
            ("gguf", "q8_0")]


def ensure_exports(model: str, ratio: float, work: Path, variants, groups=(True, False),
                   plan: str = "bi") -> dict:
    """{(pruned?, target, quant): export folder}, made by the CLI's pipeline, reused if present.
    plan "bi" scores the layers (Block Influence, 2 calibration samples); "fixed" drops the
    last layers but one without scoring: speed and memory depend on how many layers go, not
    which, and scoring a full-size model can take longer than the benchmark on a small CPU."""
    from edgevlm import pipeline
    from edgevlm.loader import load, resolve
    from edgevlm.plan import layers_to_drop
    from edgevlm.types import PrunePlan

    out = {(p, t, q): work / f"{'pruned' if p else 'full'}-{t}-{q}"
           for p in groups for t, q in variants}
    if all((folder / "manifest.json").exists() for folder in out.values()):
        return out
    pruned_dir = work / "pruned-ckpt" / "pruned"  # where prune_and_save writes
    if not (pruned_dir / "config.json").exists():
        base = load(model)
        if plan == "bi":
            scores = pipeline.score_model(base, pipeline.calibration("builtin:4"), "bi")
            chosen = pipeline.plan_for(base, scores, ratio=ratio)
        else:
            n = base.adapter.num_layers(base.config)
            drop = layers_to_drop(n, ratio, None)
            chosen = PrunePlan(method="fixed", n_layers=n, ratio=ratio,
                               layers=list(range(n - 1 - drop, n - 1)))
        pipeline.prune_and_save(base, chosen, pruned_dir.parent)
        del base
    for (pruned, target, quant), folder in out.items():
        if (folder / "manifest.json").exists():
            continue
        start = time.perf_counter()
        quant, _, vision_quant = quant.partition("+vision-")
        extra = ({"name": folder.name} if target == "gguf"
                 else {"vision_quant": vision_quant} if vision_quant else {})
        pipeline.export_target(target, pruned_dir if pruned else resolve(model), folder,
                               quant=quant, plan=None, base_model=model, verify=False,
                               samples=None, progress=False, **extra)
        print(f"exported {folder.name} in {time.perf_counter() - start:.0f}s", flush=True)
    return out


def measure_group(folders: dict, config: BenchConfig, profile, contexts, new: int,
                  repeats: int) -> dict:
    """One worker process per export; full runs then decode-at-context, interleaved."""
    with Workers() as pool:
        workers = {key: pool.start(folder, config, profile) for key, folder in folders.items()}
        warm = {k: [w.run() for _ in range(config.warmup)] for k, w in workers.items()}
        runs = {k: [] for k in workers}
        for _ in range(config.runs):
            for key, worker in workers.items():
                runs[key].append(worker.run())
        decode = {k: {c: [] for c in contexts} for k in workers}
        for context in contexts:
            for worker in workers.values():  # warm-up at this context, not recorded
                worker.decode_at(context, 4)
            for _ in range(repeats):
                for key, worker in workers.items():
                    decode[key][context].append(worker.decode_at(context, new)["decode_tok_s"])
    out = {}
    for key, worker in workers.items():
        result = result_of(worker.header, warm[key], runs[key], config, profile, None)
        facts = worker.header["facts"]
        kv = facts["text"].kv_values_per_token() * facts["kv_bytes_per_value"]
        at = {}
        for context, values in decode[key].items():
            tok_s = statistics.median(values)
            per_token = facts["decoder_weight_bytes"] + kv * context
            at[str(context)] = {"decode_tok_s": tok_s, "min": min(values), "max": max(values),
                                "bytes_per_token": per_token,
                                "roofline": tok_s * per_token / (profile.memory_bandwidth_gbs * 1e9)}
        out[key] = {"memory_mb": result.memory_mb, "peak_rss_mb": result.peak_rss_mb,
                    "load_s": result.load_s, "summary": result.summary,
                    "prompt_tokens": runs[key][0]["prompt_tokens"], "roofline": result.roofline,
                    "decode_at": at, "decoder_weight_bytes": facts["decoder_weight_bytes"],
                    "kv_bytes_per_token": kv}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:smolvlm-256m")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-footprint"))
    parser.add_argument("--only", nargs="*", default=None, help="e.g. gguf:q4_0 onnx:q4")
    parser.add_argument("--plan", default="bi", choices=["bi", "fixed"])
    parser.add_argument("--groups", nargs="+", default=["pruned", "unpruned"],
                        choices=["pruned", "unpruned"])
    parser.add_argument("--runs", type=int, default=2, help="full generations per export")
    parser.add_argument("--repeats", type=int, default=3, help="decode-at-context repeats")
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="laptop-x86")
    parser.add_argument("--bandwidth-gbs", type=float, default=None)
    parser.add_argument("--peak-gflops", type=float, default=None)
    parser.add_argument("--load", default="", help="what else ran on the machine (recorded)")
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    variants = [v for v in VARIANTS if not args.only or f"{v[0]}:{v[1]}" in args.only]
    profile = get_profile(args.device)
    changes = {k: v for k, v in (("memory_bandwidth_gbs", args.bandwidth_gbs),
                                 ("peak_gflops", args.peak_gflops)) if v}
    profile = dataclasses.replace(profile, **changes)
    args.work.mkdir(parents=True, exist_ok=True)
    groups = [g == "pruned" for g in args.groups]
    folders = ensure_exports(args.model, args.ratio, args.work, variants, groups, args.plan)
    config = BenchConfig(runs=args.runs, warmup=1, gen_tokens=args.gen_tokens, threads=args.threads)
    results = {}
    for pruned in groups:
        group = {f"{t}:{q}": folders[(pruned, t, q)] for t, q in variants}
        measured = measure_group(group, config, profile, args.contexts, 64, args.repeats)
        results["pruned" if pruned else "unpruned"] = measured
        print(json.dumps({k: {"memory_mb": v["memory_mb"], "decode_at": v["decode_at"]}
                          for k, v in measured.items()}, indent=1), flush=True)
    payload = {"model": args.model, "ratio": args.ratio, "plan": args.plan, "threads": args.threads,
               "runs": args.runs, "repeats": args.repeats, "gen_tokens": args.gen_tokens,
               "image_size": list(config.image_size),
               "roofline": {"bandwidth_gbs": profile.memory_bandwidth_gbs,
                            "peak_gflops": profile.peak_gflops, "source": args.device
                            + (" with measured figures" if changes else "")},
               "machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "load": args.load},
               "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
