"""Pruned vs unpruned GGUF in llama.cpp: prompt-processing and generation tokens/s measured in
one interleaved run, plus the peak RSS of the streaming writer. Writes JSON with the ratios.

    python benchmarks/bench_gguf.py --model tiny:smolvlm-k256 --drop 2 5 --quant q4_k_m -o bench.json

Any family the GGUF writer takes works (tiny:qwen2-vl-k256, tiny:gemma3-k256, ...). Gemma 3
needs a drop list that keeps its local/global period (e.g. --drop 1 2 3 4 5 6), or the export
is refused; tiny:qwen2.5-vl* is refused (56-px attention window, see qwen_vl.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WRITER = """
import json, resource, sys
from pathlib import Path
from edgevlm.export.gguf_export import export_gguf
art = export_gguf(Path(sys.argv[1]), Path(sys.argv[2]), quant=sys.argv[3], verify=False,
                  progress=False)
print(json.dumps({"text": art.file("text_model").path, "bytes": art.file("text_model").bytes,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def prune_copy(model_dir: Path, drop: list[int], out: Path) -> Path:
    """A pruned checkpoint, made by the pruning stage itself."""
    from edgevlm.loader import load
    from edgevlm.prune import prune_, save_pruned
    from edgevlm.types import PrunePlan

    vlm = load(str(model_dir))
    prune_(vlm, PrunePlan("manual", vlm.adapter.num_layers(vlm.config), sorted(drop)))
    return save_pruned(vlm, out)


def export(model_dir: Path, out: Path, quant: str) -> dict:
    """Export in a fresh process so its peak RSS is the writer's (plus imports)."""
    res = subprocess.run([sys.executable, "-c", WRITER, str(model_dir), str(out), quant],
                         check=True, capture_output=True, text=True)
    facts = json.loads(res.stdout.strip().splitlines()[-1])
    facts["text"] = str(out / facts["text"])
    return facts


def speed(llm, prompt: list[int], n_gen: int) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) with a fresh KV cache."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    tok = prompt[-1]
    for _ in range(n_gen):
        llm.eval([tok])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n_gen / (t2 - t1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny:smolvlm-k256")
    ap.add_argument("--drop", type=int, nargs="+", default=[2, 5])
    ap.add_argument("--quant", default="q4_k_m")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--output", default="bench_gguf.json")
    args = ap.parse_args(argv)

    import llama_cpp

    from edgevlm.loader import resolve

    base = resolve(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pruned = prune_copy(base, args.drop, tmp / "pruned")
        variants = {"unpruned": export(base, tmp / "full", args.quant),
                    "pruned": export(pruned, tmp / "cut", args.quant)}
        llms = {k: llama_cpp.Llama(model_path=v["text"], n_ctx=args.prompt_tokens + args.gen_tokens + 8,
                                   n_batch=512, n_threads=args.threads, verbose=False)
                for k, v in variants.items()}
        n_vocab = llms["unpruned"].n_vocab()
        prompt = [(7 * i + 11) % n_vocab for i in range(args.prompt_tokens)]
        runs = {k: {"pp": [], "tg": []} for k in llms}
        for llm in llms.values():  # warm-up, not recorded
            speed(llm, prompt[:16], 4)
        for _ in range(args.reps):  # interleaved so drift hits both equally
            for name, llm in llms.items():
                pp, tg = speed(llm, prompt, args.gen_tokens)
                runs[name]["pp"].append(pp)
                runs[name]["tg"].append(tg)
    result = {"model": args.model, "quant": args.quant, "dropped_layers": args.drop,
              "threads": args.threads, "prompt_tokens": args.prompt_tokens,
              "gen_tokens": args.gen_tokens, "reps": args.reps, "variants": {}}
    for name, r in runs.items():
        result["variants"][name] = {
            "pp_tok_s_median": statistics.median(r["pp"]), "tg_tok_s_median": statistics.median(r["tg"]),
            "pp_tok_s": r["pp"], "tg_tok_s": r["tg"], "file_bytes": variants[name]["bytes"],
            "writer_peak_rss_mib": variants[name]["peak_rss_mib"]}
    v = result["variants"]
    result["ratios"] = {
        "pp_speedup": v["pruned"]["pp_tok_s_median"] / v["unpruned"]["pp_tok_s_median"],
        "tg_speedup": v["pruned"]["tg_tok_s_median"] / v["unpruned"]["tg_tok_s_median"],
        "file_size": v["pruned"]["file_bytes"] / v["unpruned"]["file_bytes"]}
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios"], indent=2))
    return result


if __name__ == "__main__":
    main()
