"""The device-side commands: devices, run, bench (no torch needed)."""

from __future__ import annotations

import json
from pathlib import Path

from edgevlm import budget_cli
from edgevlm.errors import UsageError
from edgevlm.ui import info


def cmd_devices(args) -> int:
    from edgevlm.devices import builtin_profiles, detect

    detected = detect().name
    for name, profile in builtin_profiles().items():
        mark = "*" if name == detected else " "
        print(f"{mark} {name:18s} {profile.description}")
    print("(* = detected on this machine)")
    if getattr(args, "measure", False):
        from edgevlm.devices.hostbench import measure_host

        measured = measure_host()
        profile = builtin_profiles()[detected]
        print(f"measured here: memory_bandwidth_gbs = {measured['memory_bandwidth_gbs']} "
              f"(profile {profile.memory_bandwidth_gbs:g}), peak_gflops = "
              f"{measured['peak_gflops']} (profile {profile.peak_gflops:g})")
        print("(put them in a copy of the profile and pass it to bench: --device my.toml)")
    return 0


def _profile(name: str):
    from edgevlm.devices import HostFacts, detect, get_profile

    if name == "auto":
        facts = HostFacts.read()
        return detect(facts), facts
    return get_profile(name), None


def cmd_run(args) -> int:
    from edgevlm.calib import open_rgb
    from edgevlm.runtimes.bench import bench_image, make_runner

    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens {args.max_tokens} must be at least 1", "e.g. --max-tokens 64")
    budget_cli.early_check(args)
    profile, _ = _profile(args.device)
    image = bench_image() if args.image == "builtin" else open_rgb(Path(args.image))
    runner, artifact, _ = make_runner(args.export, profile, runtime=args.runtime,
                                      threads=args.threads, max_image_tokens=args.max_image_tokens)
    runner.load()
    trace = runner.generate(image, args.prompt, max_tokens=args.max_tokens,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            on_text=lambda piece: print(piece, end="", flush=True))
    print()
    info(f"[{runner.name} on {profile.name}: {trace.prompt_tokens} prompt tokens, "
         f"TTFT {trace.ttft_s * 1e3:.0f} ms, {len(trace.tokens)} tokens"
         + (f", {trace.decode_tok_s:.1f} tok/s" if trace.decode_tok_s else "") + f", stop: {trace.stop}]")
    runner.close()
    return 0


def cmd_bench(args) -> int:
    from edgevlm.runtimes.bench import BenchConfig, bench, bench_many, format_table, ratios

    if args.runs < 1 or args.warmup < 0 or args.gen_tokens < 2:
        raise UsageError("--runs must be >= 1, --warmup >= 0 and --gen-tokens >= 2",
                         "e.g. --runs 5 --warmup 1 --gen-tokens 128")
    budget_cli.early_check(args)
    profile, facts = _profile(args.device)
    config = BenchConfig(runs=args.runs, warmup=args.warmup, gen_tokens=args.gen_tokens,
                         threads=args.threads, runtime=args.runtime,
                         max_image_tokens=args.max_image_tokens)
    info(f"benchmarking {', '.join(map(str, args.exports))} on {profile.name}")
    if len(args.exports) == 1:
        results = [bench(args.exports[0], config, profile=profile, facts=facts)]
    else:  # one process per export, repetitions interleaved
        results = bench_many(args.exports, config, profile=profile, facts=facts)
    names = [str(e).rstrip("/").removesuffix("/manifest.json") for e in args.exports]
    print(format_table(results, names))
    if args.out:
        payload = results[0].to_dict() if len(results) == 1 else {
            "results": [r.to_dict() for r in results], "names": names,
            "ratios": ratios(results)}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        info(f"wrote {args.out}")
    if args.plot:
        from edgevlm.runtimes.chart import bench_chart

        bench_chart(results, names, args.plot)
    return 0
