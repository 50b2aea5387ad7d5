"""Time LC (ShortV layer contribution) with prefix reuse against the naive reference scheme.

Both run on the same model, samples and batches. Prefix reuse records each decoder layer's
input during one unmodified forward and re-runs only layers i..L-1 to ablate layer i;
the naive scheme (ShortV's reference code) runs the whole model once per layer. Decoder
layer invocations are counted with hooks, so the JSON has both the wall-time ratio and
the forward-count ratio (expected (L+1)L / (L + L(L+1)/2), about 2 for deep models; the
naive scheme also re-runs the vision tower L times, which the count leaves out).

    python benchmarks/bench_lc.py                       # deeper tiny LLaVA, 24 layers
    python benchmarks/bench_lc.py --model tiny:gemma3-k256 -o lc.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def build_deep_tiny(family: str, layers: int, hidden: int, folder: Path) -> Path:
    """A tiny model of `family` with more decoder layers, saved as a checkpoint folder."""
    import torch

    from edgevlm.tiny import FACTORIES, Shape

    torch.manual_seed(0)
    model, processor = FACTORIES.get(family)(Shape(hidden=hidden, intermediate=2 * hidden,
                                                   layers=layers), 0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def run(vlm, samples, tokens: str, batch_size: int, naive: bool) -> tuple[float, int, list[float]]:
    from edgevlm.scoring import score
    from edgevlm.scoring.hooks import count_layer_calls

    with count_layer_calls(vlm) as counter:
        start = time.perf_counter()
        result = score(vlm, samples, "lc", tokens=tokens, batch_size=batch_size, progress=False,
                       naive=naive)
        seconds = time.perf_counter() - start
    return seconds, counter["calls"], result.scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model name for edgevlm.loader.load (default: build a "
                        "deeper tiny model, see --family/--layers/--hidden)")
    parser.add_argument("--family", default="llava")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--tokens", default="visual")
    parser.add_argument("--repeats", type=int, default=3, help="runs per scheme; best is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("-o", "--out", type=Path, default=Path(__file__).parent / "results" / "bench_lc.json")
    args = parser.parse_args(argv)

    import torch

    from edgevlm.calib import load_calibration
    from edgevlm.loader import load
    from edgevlm.runtimes.provenance import package_versions

    torch.set_num_threads(args.threads)
    calib = load_calibration(f"builtin:{args.samples}")
    samples = calib.scoring + calib.heldout  # no split needed: all of them
    with tempfile.TemporaryDirectory() as tmp:
        name = args.model or str(build_deep_tiny(args.family, args.layers, args.hidden, Path(tmp)))
        vlm = load(name)
    n_layers = vlm.adapter.num_layers(vlm.config)
    run(vlm, samples[:1], args.tokens, 1, naive=False)  # warm-up (allocator, lazy imports)

    timings = {"prefix": [], "naive": []}
    calls, scores = {}, {}
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
        for scheme in ("prefix", "naive"):
            seconds, calls[scheme], scores[scheme] = run(vlm, samples, args.tokens, args.batch_size,
                                                         naive=scheme == "naive")
            timings[scheme].append(seconds)
    best = {scheme: min(times) for scheme, times in timings.items()}
    batches = -(-len(samples) // args.batch_size)
    report = {
        "model": args.model or f"tiny {args.family}, {args.layers} layers, hidden {args.hidden}",
        "family": vlm.adapter.family,
        "n_layers": n_layers,
        "samples": len(samples),
        "batch_size": args.batch_size,
        "tokens": args.tokens,
        "threads": args.threads,
        "seconds": timings,
        "best_seconds": best,
        "speedup": best["naive"] / best["prefix"],
        "layer_calls": calls,
        "layer_call_ratio": calls["naive"] / calls["prefix"],
        "expected_layer_calls": {
            "prefix": batches * (n_layers + n_layers * (n_layers + 1) // 2),
            "naive": batches * (n_layers + 1) * n_layers,
        },
        "max_abs_score_diff": max(abs(a - b) for a, b in zip(scores["prefix"], scores["naive"],
                                                             strict=True)),
        "versions": package_versions("torch", "transformers") | {"python": platform.python_version()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("n_layers", "best_seconds", "speedup", "layer_calls",
                                             "layer_call_ratio", "max_abs_score_diff")}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
