"""The summary tables (rich), each fitting 80 columns: per method the final round, the capability
guard and the labels to match random; then the paired differences to random per round and in AUC."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from jaxdpo.report.metrics import KL_TO_REF, REF_NLL, Tracks, at_round, points
from jaxdpo.report.statistics import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CONFIDENCE,
    RANDOM,
    auc_per_seed,
    differences_by_round,
    labels_to_match,
    mean_stderr,
    paired_differences,
    t_interval,
)

NO_REWARD = (
    "no held-out reward in this run (its oracle does not score responses, e.g. human labels): "
    "reward, win-rate, AUC and differences to random are not available"
)
COMPACT = dict(box=box.SIMPLE, show_edge=False, collapse_padding=True, caption_justify="left")
"""Table style: a summary's columns fit in 80 characters."""
INTERVAL = f"{CONFIDENCE:.0%} Student-t interval over seeds"


def format_mean_stderr(values: Sequence[float] | np.ndarray, seeds: int) -> str:
    """"0.123 ± 0.045", "0.123 (n=1)", or "—" without values; "(n=k)" when k < `seeds`."""
    if not len(values):
        return "—"
    mean, stderr = mean_stderr(values)
    return _with_count(f"{mean:.3f}" if stderr is None else f"{mean:.3f} ± {stderr:.3f}", len(values), seeds)


def format_difference(differences: Sequence[float] | np.ndarray, seeds: int) -> str:
    """"+0.123 [+0.045, +0.201]" (mean and t interval), "+0.123 (n=1)", or "—"."""
    if not len(differences):
        return "—"
    interval = t_interval(differences)
    bounds = "" if interval is None else f" [{interval[0]:+.3f}, {interval[1]:+.3f}]"
    return _with_count(f"{np.mean(differences):+.3f}{bounds}", len(differences), seeds)


def _with_count(text: str, n: int, seeds: int) -> str:
    return f"{text} (n={n})" if n == 1 or n < seeds else text


def _final(tracks: Tracks, rows: list[dict], method: str) -> list[float]:
    return list(at_round(tracks, max(row["round"] for row in rows if row["method"] == method)).values())


def summary_table(rows: list[dict]) -> Group:
    """Per method: the final round's labels, reward and win-rate, the start reward and the AUC (the
    seeds a method lacks are counted in its cells, "(n=k)"); the
    capability guard; the labels to match random; then each method's paired difference to random
    per round and in AUC, with 95% t intervals (or a line saying why there are none)."""
    rewards, seeds = points(rows), len({row["seed"] for row in rows})
    parts = [_method_table(rows, rewards, seeds)]
    if points(rows, REF_NLL) or points(rows, KL_TO_REF):
        parts.append(_capability_table(rows, seeds))
    if not rewards:
        parts.append(Text(NO_REWARD))
    elif RANDOM not in rewards:
        parts.append(Text(f"no '{RANDOM}' method with held-out rewards in this run: differences to {RANDOM} are not shown"))
    elif len(rewards) == 1:
        parts.append(Text(f"only '{RANDOM}' has held-out rewards in this run: no differences to show"))
    else:
        parts += [_labels_table(rewards, seeds), *_difference_tables(rewards, seeds), Text(_interval_note(seeds))]
    return Group(*parts)


def _method_table(rows: list[dict], rewards: dict[str, Tracks], seeds: int) -> Table:
    table = Table(
        title=f"final round, mean ± s.e. over {seeds} seed{'s' * (seeds != 1)}",
        caption=(
            "reward: held-out eval reward; start: at round 0; win-rate: against the initial model's responses; "
            "AUC: area under reward vs labels ÷ the labels' span, per seed (the mean reward over the budget)"
        ),
        **COMPACT,
    )
    for column in ("method", "labels", "reward", "start", "win-rate", "AUC"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
    wins = points(rows, "win_rate")
    for method in dict.fromkeys(row["method"] for row in rows):
        mine, reward = [row for row in rows if row["method"] == method], rewards.get(method, {})
        first, final = min(row["round"] for row in mine), max(row["round"] for row in mine)
        start = list(at_round(reward, first).values())
        table.add_row(
            method,
            str(max(row["labels"] for row in mine if row["round"] == final)),
            format_mean_stderr(_final(reward, rows, method), seeds),
            f"{np.mean(start):.3f}" if start else "—",
            format_mean_stderr(_final(wins.get(method, {}), rows, method), seeds),
            format_mean_stderr(list(auc_per_seed(reward).values()), seeds),
        )
    return table


def _capability_table(rows: list[dict], seeds: int) -> Table:
    table = Table(
        title=f"capability guard, final round, mean ± s.e. over {seeds} seed{'s' * (seeds != 1)}",
        caption=(
            "ref NLL: mean per-token NLL of the held-out reference responses (start: round 0, the initial model); "
            "KL: Monte Carlo estimate of KL(π_θ ‖ π_ref) per response, from the evaluation samples"
        ),
        **COMPACT,
    )
    for column in ("method", "ref NLL", "start", "KL to ref"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
    nll, kl = points(rows, REF_NLL), points(rows, KL_TO_REF)
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = nll.get(method, {})
        start = list(at_round(mine, min(min(by_round) for by_round in mine.values())).values()) if mine else []
        table.add_row(
            method,
            format_mean_stderr(_final(mine, rows, method), seeds),
            f"{np.mean(start):.3f}" if start else "—",
            format_mean_stderr(_final(kl.get(method, {}), rows, method), seeds),
        )
    return table


def _labels_table(rewards: dict[str, Tracks], seeds: int) -> Table:
    baseline = rewards[RANDOM]
    matches = {method: labels_to_match(tracks, baseline) for method, tracks in rewards.items()}
    known = next((m for m in matches.values() if m is not None), None)
    target = "" if known is None else f" ({known.target:.3f} at {known.budget} labels)"
    table = Table(
        title=f"labels to match {RANDOM}'s final mean reward{target}",
        caption=(
            "on the seed-mean curve, interpolated linearly between rounds; range: 2.5–97.5% of "
            f"{BOOTSTRAP_RESAMPLES} paired bootstrap resamples of the seeds (a spread, not a calibrated interval); "
            "reached: share of resamples that reach it"
        ),
        **COMPACT,
    )
    for column in ("method", "labels", f"of {RANDOM}'s", "range", "reached"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
    for method, match in matches.items():
        table.add_row(method, *_labels_cells(match, seeds))
    return table


def _labels_cells(match, seeds: int) -> tuple[str, str, str, str]:
    if match is None:
        return "—", "—", "—", "—"
    point = "not reached" if np.isinf(match.labels) else f"{match.labels:.0f}"
    share = "—" if np.isinf(match.labels) or not match.budget else f"{match.labels / match.budget:.0%}"
    reached = np.isfinite(match.resamples).mean()
    if seeds < 2:
        return point, share, "—", "—"
    low, high = np.quantile(match.resamples, [0.025, 0.975], method="inverted_cdf")
    bounds = [f"{bound:.0f}" if np.isfinite(bound) else "not reached" for bound in (low, high)]
    return point, share, "not reached" if np.isinf(low) else f"[{bounds[0]}, {bounds[1]}]", f"{reached:.0%}"


def _difference_tables(rewards: dict[str, Tracks], seeds: int) -> list[Table]:
    """The final round's and the AUC's differences with intervals, one row per method; then the mean
    difference of every round (their intervals are the bands of curves.png)."""
    baseline, others = rewards[RANDOM], [method for method in rewards if method != RANDOM]
    by_round = {method: differences_by_round(rewards[method], baseline) for method in others}
    final_round, final_labels, _ = by_round[others[0]][-1]
    summary = Table(title=f"difference to {RANDOM}, paired by seed: mean [{INTERVAL}]", **COMPACT)
    for column in ("method", f"round {final_round} ({final_labels} labels)", "AUC"):
        summary.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
    per_round = Table(title=f"mean difference to {RANDOM} per round (labels)", **COMPACT)
    per_round.add_column("method", no_wrap=True)
    for round_, labels, _ in by_round[others[0]]:
        per_round.add_column(f"{round_} ({labels})", justify="right", no_wrap=True)
    for method in others:
        auc = paired_differences(auc_per_seed(rewards[method]), auc_per_seed(baseline))
        summary.add_row(method, format_difference(by_round[method][-1][2], seeds), format_difference(auc, seeds))
        per_round.add_row(method, *(f"{np.mean(d):+.3f}" if d else "—" for _, _, d in by_round[method]))
    return [summary, per_round]


def _interval_note(seeds: int) -> str:
    if seeds < 2:
        return "one seed: no intervals"
    return (
        f"intervals: {INTERVAL} (mean ± t·s/√n of the seeds' differences); they cover 95% when the differences "
        "are normal, less when they are strongly skewed (about 88-90% at skewness 2); see jaxdpo.report. "
        f"Bootstrap generator seed {BOOTSTRAP_SEED}"
    )
