"""Run reports: the summary table and `curves.png`, from a run's metrics rows (one per method, seed
and round; `read_metrics` reads them back from `metrics.jsonl`).

Every statistic is over seeds. The tracks of one seed share their prompts, so methods are compared
seed by seed:

- **Reward**: per method and round, the mean held-out reward over seeds ± its standard error
  (sample s.d. / √n). With one seed the mean is shown alone, marked "n=1".
- **Paired difference to `random`**: per method and round t, dₛ = reward(method, s, t) −
  reward(random, s, t) for every seed s that both have; shown as mean(d) with a 95% percentile
  bootstrap interval: the seeds' d are resampled with replacement `BOOTSTRAP_RESAMPLES` times
  (NumPy's default generator seeded with `BOOTSTRAP_SEED`, so a report is reproducible) and the
  2.5th and 97.5th percentiles of the resampled means are the interval. Limits: it treats seeds as
  independent draws and it is too narrow with few seeds — it cannot reach beyond the most extreme
  dₛ, and its spread is the plug-in s.d. (divisor n, not n − 1). For normal dₛ a simulation gives
  its coverage as about 52% with 2 seeds, 74% with 3, 84% with 5, 90% with 10 and 93% with 20; the
  table says so below `FEW_SEEDS` seeds. With one seed there is no interval.
- **Area under the curve (AUC)**: per seed, the trapezoid of reward over labels collected,
  divided by the span of labels (last − first): the curve's mean reward over the labeling budget,
  in reward units (a flat curve at r has AUC r), so runs with other budgets stay comparable. Rounds
  without a reward are skipped (the trapezoid bridges them); a seed with fewer than two rounds has
  no AUC; a seed that stopped early is averaged over its own shorter budget. Shown as mean ± s.e.
  over seeds, and as a paired difference to `random` with the same bootstrap.

A missing value (a null field, NaN, a method without some seeds or rounds) is left out of every
statistic; counts below the run's number of seeds are shown as "(n=k)". Runs without any held-out
reward (human labels: people do not score held-out answers) get a table that says so and a
`curves.png` of the DPO training loss instead.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from jaxdpo.experiment.storage import METRICS

RANDOM, REWARD, TRAIN_LOSS = "random", "eval_reward", "train_loss"
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE, FEW_SEEDS = 10_000, 0, 0.95, 10
NO_REWARD = (
    "no held-out reward in this run (its oracle does not score responses, e.g. human labels): "
    "reward, win-rate, AUC and differences to random are not available"
)
NOTHING_TO_PLOT = "no round has a held-out reward or a training loss yet"
PLOT_TITLES = {REWARD: "Held-out reward against labels collected, per selection method",
               TRAIN_LOSS: "DPO training loss against labels collected, per selection method (no held-out reward)"}
LINE_STYLES = ("-", "--", ":", "-.")
COMPACT = dict(box=box.SIMPLE, show_edge=False, collapse_padding=True, caption_justify="left")
"""Table style: a summary's columns fit in 80 characters."""

Tracks = dict[int, dict[int, tuple[int, float]]]
"""One method's values: {seed: {round: (labels collected, value)}}."""


# -- metrics.jsonl --------------------------------------------------------------------------------


def read_run(folder: str | Path) -> list[dict]:
    """The metrics rows of the run in `folder`."""
    return read_metrics(Path(folder) / METRICS)


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a `metrics.jsonl`; NaN and Infinity tokens (older runs wrote them for unscored
    rounds) read as null. A missing file, a malformed line or a repeated (method, seed, round)
    raises ValueError naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise ValueError(f"{path}: cannot read it ({error.strerror}); is {path.parent} a run folder?") from error
    rows, first_seen = [], {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = _checked_row(json.loads(line, parse_constant=lambda _: None))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {number} is not valid JSON ({error.msg})") from error
        except ValueError as error:
            raise ValueError(f"{path}: line {number}: {error}") from error
        key = (row["method"], row["seed"], row["round"])
        if key in first_seen:
            raise ValueError(f"{path}: line {number} repeats method {key[0]!r} seed {key[1]} round {key[2]} of line {first_seen[key]}")
        first_seen[key] = number
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _checked_row(row) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    for name, valid, kind in (
        ("method", lambda v: isinstance(v, str) and v, "a non-empty string"),
        ("seed", _is_int, "an integer"),
        ("round", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
        ("labels", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ):
        if name not in row:
            raise ValueError(f"missing field {name!r}")
        if not valid(row[name]):
            raise ValueError(f"field {name!r} must be {kind}, got {row[name]!r}")
    for name in (REWARD, "win_rate", TRAIN_LOSS):
        value = row.get(name)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            raise ValueError(f"field {name!r} must be a number or null, got {value!r}")
    return row


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- statistics -----------------------------------------------------------------------------------


def points(rows: list[dict], key: str = REWARD) -> dict[str, Tracks]:
    """{method: {seed: {round: (labels, value)}}} of the rows whose `key` is a finite number."""
    out: dict[str, Tracks] = {}
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out.setdefault(row["method"], {}).setdefault(row["seed"], {})[row["round"]] = (row["labels"], float(value))
    return out


def rounds_of(tracks: Tracks) -> list[int]:
    return sorted(set(itertools.chain.from_iterable(tracks.values())))


def at_round(tracks: Tracks, round_: int) -> dict[int, float]:
    """{seed: value} at one round."""
    return {seed: by_round[round_][1] for seed, by_round in tracks.items() if round_ in by_round}


def labels_at(tracks: Tracks, round_: int) -> int:
    """Labels collected by `round_` (the most of any seed; normally all seeds agree)."""
    return max(by_round[round_][0] for by_round in tracks.values() if round_ in by_round)


def values_by_round(tracks: Tracks) -> list[tuple[int, int, list[float]]]:
    """(round, labels, values over seeds) per round."""
    return [(round_, labels_at(tracks, round_), list(at_round(tracks, round_).values())) for round_ in rounds_of(tracks)]


def differences_by_round(tracks: Tracks, baseline: Tracks) -> list[tuple[int, int, list[float]]]:
    """(round, labels, paired differences to `baseline`) per round of `baseline`."""
    return [
        (round_, labels_at(baseline, round_), paired_differences(at_round(tracks, round_), at_round(baseline, round_)))
        for round_ in rounds_of(baseline)
    ]


def paired_differences(method: dict[int, float], baseline: dict[int, float]) -> list[float]:
    """method − baseline for each seed both have, in seed order."""
    return [method[seed] - baseline[seed] for seed in sorted(method.keys() & baseline.keys())]


def mean_stderr(values: Sequence[float] | np.ndarray) -> tuple[float, float | None]:
    """Mean and standard error (None for a single value)."""
    values = np.asarray(values, np.float64)
    stderr = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
    return float(values.mean()), stderr


def bootstrap_interval(
    values: Sequence[float] | np.ndarray, *, confidence: float = CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean (None for fewer than two values); deterministic."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return None
    picks = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    tail = 50 * (1 - confidence)
    low, high = np.percentile(values[picks].mean(axis=1), [tail, 100 - tail])
    return float(low), float(high)


def area_under_curve(labels: Sequence[int] | np.ndarray, values: Sequence[float] | np.ndarray) -> float | None:
    """Trapezoid of `values` over `labels`, divided by the span of `labels`: the mean value over the
    labeling budget (None when fewer than two distinct label counts)."""
    order = np.argsort(labels, kind="stable")
    x, y = np.asarray(labels, np.float64)[order], np.asarray(values, np.float64)[order]
    if len(x) < 2 or x[-1] <= x[0]:
        return None
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / (x[-1] - x[0]))


def auc_per_seed(tracks: Tracks) -> dict[int, float]:
    """{seed: area under its curve} for the seeds with at least two rounds."""
    areas = {seed: area_under_curve(*zip(*by_round.values())) for seed, by_round in tracks.items()}
    return {seed: area for seed, area in areas.items() if area is not None}


# -- formatting -----------------------------------------------------------------------------------


def format_mean_stderr(values: Sequence[float] | np.ndarray, seeds: int) -> str:
    """"0.123 ± 0.045", "0.123 (n=1)", or "—" without values; "(n=k)" when k < `seeds`."""
    if not len(values):
        return "—"
    mean, stderr = mean_stderr(values)
    return _with_count(f"{mean:.3f}" if stderr is None else f"{mean:.3f} ± {stderr:.3f}", len(values), seeds)


def format_difference(differences: Sequence[float] | np.ndarray, seeds: int) -> str:
    """"+0.123 [+0.045, +0.201]" (mean and bootstrap interval), "+0.123 (n=1)", or "—"."""
    if not len(differences):
        return "—"
    interval = bootstrap_interval(differences)
    bounds = "" if interval is None else f" [{interval[0]:+.3f}, {interval[1]:+.3f}]"
    return _with_count(f"{np.mean(differences):+.3f}{bounds}", len(differences), seeds)


def _with_count(text: str, n: int, seeds: int) -> str:
    return f"{text} (n={n})" if n == 1 or n < seeds else text


# -- the summary ----------------------------------------------------------------------------------


def summary_table(rows: list[dict]) -> Group:
    """Per method: the final round's labels, reward and win-rate, the start reward and the AUC; then
    each method's paired difference to random per round and in AUC, with 95% bootstrap intervals
    (or a line saying why there are none)."""
    rewards, seeds = points(rows), len({row["seed"] for row in rows})
    parts = [_method_table(rows, rewards, seeds)]
    if not rewards:
        parts.append(Text(NO_REWARD))
    elif RANDOM not in rewards:
        parts.append(Text(f"no '{RANDOM}' method with held-out rewards in this run: differences to {RANDOM} are not shown"))
    elif len(rewards) == 1:
        parts.append(Text(f"only '{RANDOM}' has held-out rewards in this run: no differences to show"))
    else:
        parts += [_difference_table(rewards, seeds), Text(_bootstrap_note(seeds))]
    return Group(*parts)


def _method_table(rows: list[dict], rewards: dict[str, Tracks], seeds: int) -> Table:
    table = Table(
        title="final round, mean ± s.e. over seeds",
        caption=(
            "reward: held-out eval reward; start: at round 0; win-rate: against the initial model's responses; "
            "AUC: area under reward vs labels ÷ the labels' span, per seed (the mean reward over the budget)"
        ),
        **COMPACT,
    )
    for column in ("method", "seeds", "labels", "reward", "start", "win-rate", "AUC"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
    wins = points(rows, "win_rate")
    for method in dict.fromkeys(row["method"] for row in rows):
        mine, reward = [row for row in rows if row["method"] == method], rewards.get(method, {})
        first, final = min(row["round"] for row in mine), max(row["round"] for row in mine)
        start = list(at_round(reward, first).values())
        table.add_row(
            method,
            str(len({row["seed"] for row in mine})),
            str(max(row["labels"] for row in mine if row["round"] == final)),
            format_mean_stderr(list(at_round(reward, final).values()), seeds),
            f"{np.mean(start):.3f}" if start else "—",
            format_mean_stderr(list(at_round(wins.get(method, {}), final).values()), seeds),
            format_mean_stderr(list(auc_per_seed(reward).values()), seeds),
        )
    return table


def _difference_table(rewards: dict[str, Tracks], seeds: int) -> Table:
    baseline, others = rewards[RANDOM], [method for method in rewards if method != RANDOM]
    table = Table(title=f"difference to {RANDOM}, paired by seed: mean [{CONFIDENCE:.0%} bootstrap interval over seeds]", **COMPACT)
    for column in ("round", "labels", *(f"{method} − {RANDOM}" for method in others)):
        table.add_column(column, justify="right")
    columns = [differences_by_round(rewards[method], baseline) for method in others]
    for same_round in zip(*columns):
        round_, labels, _ = same_round[0]
        table.add_row(str(round_), str(labels), *(format_difference(differences, seeds) for _, _, differences in same_round))
    cells = (format_difference(paired_differences(auc_per_seed(rewards[m]), auc_per_seed(baseline)), seeds) for m in others)
    table.add_row("AUC", "", *cells)
    return table


def _bootstrap_note(seeds: int) -> str:
    if seeds < 2:
        return "one seed: no intervals"
    note = f"intervals: percentile bootstrap over seeds, {BOOTSTRAP_RESAMPLES} resamples, generator seed {BOOTSTRAP_SEED}"
    if seeds < FEW_SEEDS:
        note += f"; with {seeds} seeds they are too narrow (such intervals cover about 84% at 5 seeds, 90% at 10)"
    return note


# -- curves.png -----------------------------------------------------------------------------------


def plot_curves(rows: list[dict], path: str | Path, *, title: str = "") -> Path | None:
    """One run's `curves.png` (see `plot_runs`)."""
    return plot_runs({"": rows}, path, title=title)


def plot_runs(runs: dict[str, list[dict]], path: str | Path, *, title: str = "") -> Path | None:
    """Left: eval reward against labels collected, mean ± 1 s.e. over seeds, the legend giving each
    method's AUC. Right (runs with `random`): each method's paired difference to random with its
    95% bootstrap band. Several runs share the axes: color = method, line style = run, legend
    "run: method". Without any held-out reward the left panel shows the DPO training loss instead;
    with neither, nothing is written and None is returned (`NOTHING_TO_PLOT`). The figure's title
    says which (`PLOT_TITLES`), then `title` (e.g. the run folders) on a line below."""
    key = next((key for key in (REWARD, TRAIN_LOSS) if any(points(rows, key) for rows in runs.values())), None)
    if key is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {run: points(rows, key) for run, rows in runs.items()}
    compared = key == REWARD and any(RANDOM in methods and len(methods) > 1 for methods in curves.values())
    fig, axes = plt.subplots(1, 1 + compared, figsize=(6 + 5 * compared, 4), squeeze=False)
    colors = {method: f"C{i % 10}" for i, method in enumerate(dict.fromkeys(m for methods in curves.values() for m in methods))}
    for style, (run, methods) in zip(itertools.cycle(LINE_STYLES), curves.items()):
        seeds = len({row["seed"] for row in runs[run]})
        for method, tracks in methods.items():
            name = f"{run}: {method}" if len(runs) > 1 else method
            auc = f" (AUC {format_mean_stderr(list(auc_per_seed(tracks).values()), seeds)})" if key == REWARD else ""
            _draw(axes[0, 0], _bands(values_by_round(tracks), _stderr_band), colors[method], style, name + auc)
            if compared and RANDOM in methods and method != RANDOM:
                _draw(axes[0, 1], _bands(differences_by_round(tracks, methods[RANDOM]), _bootstrap_band), colors[method], style, name)
    _label_axes(axes[0], key, colors.get(RANDOM))
    fig.suptitle(PLOT_TITLES[key] + (f"\n{title}" if title else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _label_axes(axes, key: str, random_color: str | None) -> None:
    """Titles, axis labels, grids and legends; the differences panel (if any) gets the zero line."""
    from matplotlib.ticker import MaxNLocator

    axes[0].set_ylabel("mean oracle reward (held-out prompts)" if key == REWARD else "DPO training loss (last step of the round)")
    axes[0].set_title("reward, ±1 s.e. over seeds" if key == REWARD else "no held-out reward: DPO training loss, ±1 s.e.")
    if len(axes) > 1:
        axes[1].axhline(0.0, color=random_color, linewidth=1)
        axes[1].set_ylabel(f"reward − {RANDOM} (same seed)")
        axes[1].set_title(f"difference to {RANDOM}, {CONFIDENCE:.0%} bootstrap band over seeds")
    for ax in axes:
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


def _bootstrap_band(values: list[float]) -> tuple[float, float, float]:
    mean = float(np.mean(values))
    return (mean, *(bootstrap_interval(values) or (mean, mean)))


def _draw(ax, curve: np.ndarray, color: str, linestyle: str, label: str) -> None:
    labels, center, low, high = curve.T
    ax.plot(labels, center, marker="o", color=color, linestyle=linestyle, label=label)
    ax.fill_between(labels, low, high, color=color, alpha=0.15)
