"""`curves.png`: reward (or training loss) and the paired differences to random against labels
collected, and the capability guard (reference NLL, KL to the reference), for one run or several
overlaid."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from jaxdpo.report.metrics import KL_TO_REF, REF_NLL, REWARD, TRAIN_LOSS, points, values_by_round
from jaxdpo.report.statistics import CONFIDENCE, RANDOM, auc_per_seed, differences_by_round, mean_stderr, t_interval
from jaxdpo.report.tables import format_mean_stderr

NOTHING_TO_PLOT = "no round has a held-out reward or a training loss yet"
PLOT_TITLES = {REWARD: "Held-out reward against labels collected, per selection method",
               TRAIN_LOSS: "DPO training loss against labels collected, per selection method (no held-out reward)"}
LINE_STYLES = ("-", "--", ":", "-.")
GUARD_PANELS = {
    REF_NLL: ("per-token NLL of held-out reference responses", "capability guard: reference NLL, ±1 s.e."),
    KL_TO_REF: ("KL(π_θ ‖ π_ref) per response (Monte Carlo)", "capability guard: KL to the reference, ±1 s.e."),
}


def plot_curves(rows: list[dict], path: str | Path, *, title: str = "") -> Path | None:
    """One run's `curves.png` (see `plot_runs`)."""
    return plot_runs({"": rows}, path, title=title)


def plot_runs(runs: dict[str, list[dict]], path: str | Path, *, title: str = "") -> Path | None:
    """Panels against labels collected: eval reward, mean ± 1 s.e. over seeds, the legend giving each
    method's AUC; (runs with `random`) each method's paired difference to random with its 95% t
    band; (runs that record them) the reference NLL and the KL to the reference, ± 1 s.e. Several
    runs share the axes: color = method, line style = run, legend "run: method". Without any
    held-out reward the first panel shows the DPO training loss instead; with neither, nothing is
    written and None is returned (`NOTHING_TO_PLOT`). The figure's title says which
    (`PLOT_TITLES`), then `title` (e.g. the run folders) on a line below."""
    key = next((key for key in (REWARD, TRAIN_LOSS) if any(points(rows, key) for rows in runs.values())), None)
    if key is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {run: points(rows, key) for run, rows in runs.items()}
    compared = key == REWARD and any(RANDOM in methods and len(methods) > 1 for methods in curves.values())
    guards = [field for field in GUARD_PANELS if any(points(rows, field) for rows in runs.values())]
    panels = 1 + compared + len(guards)
    fig, axes = plt.subplots((panels + 1) // 2, min(panels, 2), figsize=(6 + 5 * (panels > 1), 4 * ((panels + 1) // 2)), squeeze=False)
    axes = axes.ravel()
    colors = {method: f"C{i % 10}" for i, method in enumerate(dict.fromkeys(row["method"] for rows in runs.values() for row in rows))}
    for style, (run, methods) in zip(itertools.cycle(LINE_STYLES), curves.items()):
        seeds = len({row["seed"] for row in runs[run]})
        name = (lambda method, run=run: f"{run}: {method}") if len(runs) > 1 else str
        for method, tracks in methods.items():
            auc = f" (AUC {format_mean_stderr(list(auc_per_seed(tracks).values()), seeds)})" if key == REWARD else ""
            _draw(axes[0], _bands(values_by_round(tracks), _stderr_band), colors[method], style, name(method) + auc)
            if compared and RANDOM in methods and method != RANDOM:
                _draw(axes[1], _bands(differences_by_round(tracks, methods[RANDOM]), _interval_band), colors[method], style, name(method))
        for ax, field in zip(axes[1 + compared :], guards):
            for method, tracks in points(runs[run], field).items():
                _draw(ax, _bands(values_by_round(tracks), _stderr_band), colors[method], style, name(method))
    _label_axes(axes, key, compared, guards, colors.get(RANDOM))
    for ax in axes[panels:]:
        ax.set_visible(False)
    fig.suptitle(PLOT_TITLES[key] + (f"\n{title}" if title else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _label_axes(axes, key: str, compared: bool, guards: list[str], random_color: str | None) -> None:
    """Titles, axis labels, grids and legends; the differences panel (if any) gets the zero line."""
    from matplotlib.ticker import MaxNLocator

    axes[0].set_ylabel("mean oracle reward (held-out prompts)" if key == REWARD else "DPO training loss (last step of the round)")
    axes[0].set_title("reward, ±1 s.e. over seeds" if key == REWARD else "no held-out reward: DPO training loss, ±1 s.e.")
    if compared:
        axes[1].axhline(0.0, color=random_color, linewidth=1)
        axes[1].set_ylabel(f"reward − {RANDOM} (same seed)")
        axes[1].set_title(f"difference to {RANDOM}, {CONFIDENCE:.0%} t band over seeds")
    for ax, field in zip(axes[1 + compared :], guards):
        ax.set_ylabel(GUARD_PANELS[field][0])
        ax.set_title(GUARD_PANELS[field][1])
    for ax in axes[: 1 + compared + len(guards)]:
        ax.set_xlabel("labels collected")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # a count: no 15.2 … 16.8 ticks when one round spans few labels
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")


def _bands(by_round: list[tuple[int, int, list[float]]], band) -> np.ndarray:
    """Rows (labels, center, low, high): `band` of each round's values, rounds without values left out."""
    return np.asarray([(labels, *band(values)) for _, labels, values in by_round if values], np.float64).reshape(-1, 4)


def _stderr_band(values: list[float]) -> tuple[float, float, float]:
    mean, stderr = mean_stderr(values)
    return mean, mean - (stderr or 0.0), mean + (stderr or 0.0)


def _interval_band(values: list[float]) -> tuple[float, float, float]:
    mean = float(np.mean(values))
    return (mean, *(t_interval(values) or (mean, mean)))


def _draw(ax, curve: np.ndarray, color: str, linestyle: str, label: str) -> None:
    labels, center, low, high = curve.T
    ax.plot(labels, center, marker="o", color=color, linestyle=linestyle, label=label)
    ax.fill_between(labels, low, high, color=color, alpha=0.15)
