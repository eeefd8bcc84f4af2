"""The end-of-run summary table and `curves.png` (eval reward against labels collected, one line
per method with a ±1 standard-error band over seeds — the layout of the paper's Fig. 1)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np


def by_method_and_labels(rows: list[dict], key: str = "eval_reward") -> dict[str, dict[int, list[float]]]:
    """{method: {labels: [value per seed]}}."""
    out: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        out[row["method"]][row["labels"]].append(row[key])
    return out


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    values = np.asarray(values, np.float64)
    stderr = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return float(values.mean()), float(stderr)


def summary_table(rows: list[dict]):
    """A rich Table: per method, the final round's labels, eval reward and win-rate (mean ± s.e. over seeds)."""
    from rich.table import Table

    table = Table(title="ActiveDPO run summary (final round, mean ± s.e. over seeds)")
    for column in ("method", "seeds", "labels", "eval reward", "start reward", "win-rate vs initial"):
        table.add_column(column, justify="left" if column == "method" else "right")
    rewards, wins = by_method_and_labels(rows), by_method_and_labels(rows, "win_rate")
    for method, curve in rewards.items():
        last, first = max(curve), min(curve)
        reward, reward_se = _mean_stderr(curve[last])
        start, _ = _mean_stderr(curve[first])
        win, win_se = _mean_stderr(wins[method][last])
        table.add_row(
            method, str(len(curve[last])), str(last), f"{reward:.3f} ± {reward_se:.3f}", f"{start:.3f}", f"{win:.3f} ± {win_se:.3f}"
        )
    return table


def plot_curves(rows: list[dict], path: str | Path, *, title: str = "") -> Path:
    """Eval reward vs labels collected, one line per method, band = ±1 s.e. over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, curve in by_method_and_labels(rows).items():
        labels = sorted(curve)
        stats = np.asarray([_mean_stderr(curve[n]) for n in labels])
        mean, stderr = stats[:, 0], np.nan_to_num(stats[:, 1])
        ax.plot(labels, mean, marker="o", label=method)
        ax.fill_between(labels, mean - stderr, mean + stderr, alpha=0.2)
    ax.set_xlabel("labels collected")
    ax.set_ylabel("mean oracle reward (held-out prompts)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
