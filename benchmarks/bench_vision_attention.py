"""The ONNX vision encoder with onnxruntime's fused attention against torch.onnx's decomposed
attention: peak memory and time of encoding tiles, same weights, interleaved rounds.

Exports the vision encoder (+ projector) of `--model` twice (fused: what `edgevlm export`
writes for SmolVLM / LLaVA / Gemma 3; decomposed: torch.onnx's MatMul / Softmax / NaN-guard
form), then in fresh processes (glibc mmap threshold fixed, so RSS follows live memory; no
arena, as the runner's vision session) encodes `--tiles` tiles per call and records the
growth of the kernel's peak RSS over the loaded session and the wall time. The ideal next to
it: one layer's (heads, patches, patches) fp32 score tensor, which the fused kernel never
materialises and the decomposed graph holds several of.

    python benchmarks/bench_vision_attention.py --model random:smolvlm-256m --rounds 3 \\
        -o benchmarks/results/vision-attention-smolvlm-256m.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, sys, time
import numpy as np
import onnxruntime as ort
from edgevlm.runtimes import measure

path, tiles, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.enable_cpu_mem_arena = False
session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
feeds = {"pixel_values": rng.standard_normal((1, tiles, 3, size, size), dtype=np.float32),
         "pixel_attention_mask": np.ones((1, tiles, size, size), dtype=bool)}
session.run(None, feeds)  # first run of the shape: once-only allocations
measure._reset_kernel_peak()
before = measure.current_rss_mb()
start = time.perf_counter()
features = session.run(None, feeds)[0]
seconds = time.perf_counter() - start
print(json.dumps({"growth_mb": measure._kernel_peak_mb() - before, "seconds": seconds,
                  "checksum": float(np.abs(features).sum())}))
"""


def export_both(model: str, work: Path) -> dict:
    """{"fused": path, "decomposed": path}, exported once under `work` (SmolVLM-like
    towers: no image-flag channel)."""
    from edgevlm.export.onnx_export import vision
    from edgevlm.loader import load

    paths = {kind: work / f"vision-{kind}.onnx" for kind in ("fused", "decomposed")}
    if all(p.exists() for p in paths.values()):
        return paths
    vlm = load(model)
    vision.export_vision(vlm, paths["fused"])
    # Outside fused_vision_attention: torch.onnx's own translation of the attention.
    wrapper, names, example, dynamic = vision.vision_wrapper(vlm)
    vision._export(wrapper.eval(), example, paths["decomposed"], names, ["image_features"],
                   dynamic)
    return paths


def probe(path: Path, tiles: int, size: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), str(tiles), str(size)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:smolvlm-256m")
    parser.add_argument("--tiles", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-vision-attention"))
    parser.add_argument("--load", default="", help="what else ran on the machine (recorded)")
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    from edgevlm.loader import load

    args.work.mkdir(parents=True, exist_ok=True)
    paths = export_both(args.model, args.work)
    vcfg = load(args.model).config.vision_config
    size, patches = int(vcfg.image_size), (int(vcfg.image_size) // int(vcfg.patch_size)) ** 2
    scores_mb = int(vcfg.num_attention_heads) * patches * patches * 4 / 1e6
    results = {}
    for tiles in args.tiles:
        rounds = {kind: [] for kind in paths}
        for _ in range(args.rounds):  # interleaved: noise hits both alike
            for kind, path in paths.items():
                rounds[kind].append(probe(path, tiles, size))
        ratios = [d["seconds"] / f["seconds"]
                  for f, d in zip(rounds["fused"], rounds["decomposed"], strict=True)]
        results[str(tiles)] = {
            kind: {"growth_mb": statistics.median(r["growth_mb"] for r in runs),
                   "seconds": statistics.median(r["seconds"] for r in runs),
                   "rounds": runs} for kind, runs in rounds.items()}
        results[str(tiles)]["speedup"] = {"median": statistics.median(ratios),
                                          "min": min(ratios), "max": max(ratios)}
        same = {r["checksum"] for runs in rounds.values() for r in runs}
        results[str(tiles)]["max_checksum_rel_diff"] = (max(same) - min(same)) / max(same)
        print(json.dumps({tiles: {k: (v["growth_mb"], v["seconds"]) for k, v in
                                  results[str(tiles)].items() if k in paths}}), flush=True)
    payload = {"model": args.model, "image_size": size, "patches_per_tile": patches,
               "heads": int(vcfg.num_attention_heads),
               "ideal": {"scores_tensor_mb_per_tile": scores_mb,
                         "note": "one layer's fp32 (heads, patches, patches) tensor per tile"},
               "threads": 1, "rounds": args.rounds,
               "machine": {"platform": platform.platform(), "load": args.load},
               "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
