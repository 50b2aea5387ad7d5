"""layer_scores.png: per-layer importance with the removed layers marked (matplotlib optional)."""

from __future__ import annotations

from pathlib import Path

from edgevlm.types import LayerScores
from edgevlm.ui import info


def plot_scores(scores: LayerScores, path: Path, dropped: list[int] | None = None) -> Path | None:
    """Write the plot, or say why not and return None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        info('note: matplotlib is not installed, skipping layer_scores.png '
             '(pip install "edgevlm[plot]")')
        return None
    dropped = set(dropped or [])
    n = scores.n_layers
    colors = ["#d62728" if i in dropped else "#1f77b4" for i in range(n)]
    fig, ax = plt.subplots(figsize=(max(6, n * 0.3), 3.2), dpi=120)
    ax.bar(range(n), scores.scores, color=colors)
    ax.set_xlabel("decoder layer (original index)")
    ax.set_ylabel(f"{scores.method} importance")
    title = f"{scores.model or 'model'}: {scores.method}"
    if dropped:
        title += f" — {len(dropped)} removed (red)"
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(n))
    ax.tick_params(axis="x", labelsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
