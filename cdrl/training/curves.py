"""Training curves of a run folder as one PNG, from its metrics.jsonl.

Every run writes ``curves.png`` at its end; ``cdrl-curves RUN`` (cli/curves.py) redraws it for any
run folder, finished or not, so a run without tensorboard still has its curves. Panels: the losses, the mean energy gap, and per level
the energy gap E(y-) - E(y+) and the RMS error of the refined negatives from y+.
"""

from __future__ import annotations

import json
from pathlib import Path

from cdrl.utils import atomic_write

CURVES_FILE = "curves.png"
PANELS = (
    ("losses", ("ebm/loss", "init/mse", "init/data_mse")),
    ("mean energy gap E(y-) - E(y+)", ("ebm/energy_gap",)),
    ("per-level energy gap", "level{}/gap"),
    ("per-level RMS error of y- from y+", "level{}/rms_err"),
)


def read_metrics(path: str | Path) -> list[dict]:
    """The step records of a metrics.jsonl (guard events and a line cut short by a kill are skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record and "event" not in record:
            records.append(record)
    return records


def plot_curves(metrics: str | Path, output: str | Path) -> Path:
    """Draw the curves of ``metrics`` (a metrics.jsonl) into the PNG ``output``, atomically.

    Raises:
        ValueError: the file holds no step records yet.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics)
    if not records:
        raise ValueError(f"{metrics} holds no step records yet")
    steps = [r["step"] for r in records]
    num_levels = sum(1 for key in records[-1] if key.startswith("level") and key.endswith("/gap"))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for ax, (title, keys) in zip(axes, PANELS, strict=True):
        if isinstance(keys, str):
            keys = [keys.format(level) for level in range(num_levels)]
        for key in keys:
            values = [r.get(key) for r in records]
            if any(v is not None for v in values):
                ax.plot(steps, [float("nan") if v is None else v for v in values], label=key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    axes[0].set_yscale("symlog", linthresh=1e-3)
    fig.tight_layout()
    with atomic_write(output) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(output)
