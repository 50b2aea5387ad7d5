"""Optional PNG chart of bench results (matplotlib, if installed)."""

from __future__ import annotations

from pathlib import Path

from edgevlm.ui import info


def bench_chart(results, names: list[str], path: Path) -> Path | None:
    """Bars of prefill and decode tokens/s per export; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        info('note: matplotlib is not installed, skipping the chart (pip install "edgevlm[plot]")')
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=120)
    for ax, key, label in ((axes[0], "prefill_tok_s", "prefill (pp) tok/s"),
                           (axes[1], "decode_tok_s", "decode (tg) tok/s")):
        values = [(r.summary.get(key) or {}).get("median", 0) for r in results]
        ax.bar(range(len(values)), values, color="#1f77b4")
        ax.set_xticks(range(len(values)), [n[-18:] for n in names], rotation=20, fontsize=7)
        ax.set_title(label, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
