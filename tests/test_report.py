"""Run reports: paired differences to random with t intervals (and their coverage), areas under the
curves, labels to match random, the capability guard,
runs without held-out rewards or with one seed (never "nan"), and `jaxdpo report` end to end."""

from __future__ import annotations

import json

import matplotlib.figure
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from rich.console import Console

from jaxdpo import report
from jaxdpo.cli import EXIT_CONFIG, main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_rows(rewards: dict[str, list[list[float | None]]], *, batch: int = 16) -> list[dict]:
    """Metrics rows from {method: [[reward of round 0, 1, ...] per seed]}; a None reward is a null field."""
    rows = []
    for method, seeds in rewards.items():
        for seed, curve in enumerate(seeds):
            for round_, reward in enumerate(curve):
                row = dict(method=method, seed=seed, round=round_, labels=batch * round_, eval_reward=reward,
                           eval_reward_stderr=None if reward is None else 0.01, win_rate=None if reward is None else 0.5)
                if round_:
                    row["train_loss"] = 0.7 - 0.01 * round_
                rows.append(row)
    return rows


def rendered(renderable) -> str:
    console = Console(record=True, width=160)
    console.print(renderable)
    return console.export_text()


def human_rows() -> list[dict]:
    """A human-labeled run: every eval field is null, training losses exist from round 1."""
    return make_rows({"activedpo": [[None] * 3] * 2, "random": [[None] * 3] * 2})


def write_metrics(folder, rows) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def finite_lines(figure) -> int:
    return sum(np.isfinite(np.asarray(line.get_ydata(), float)).any() for ax in figure.axes for line in ax.lines)


@pytest.fixture
def saved_figures(monkeypatch) -> list:
    """The figures `plot_curves` saves, to look at what they draw."""
    figures, savefig = [], matplotlib.figure.Figure.savefig

    def record(figure, *args, **kwargs):
        figures.append(figure)
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    return figures


# -- statistics -----------------------------------------------------------------------------------


def test_t_interval_ends_are_where_the_t_test_rejects_at_five_percent():
    """Independent reference: scipy's one-sample t-test has p = 0.05 exactly at the interval's ends."""
    values = np.asarray([0.31, -0.12, 0.05, 0.44, 0.18])
    low, high = report.t_interval(values)
    assert low < values.mean() < high
    for end in (low, high):
        assert stats.ttest_1samp(values, end).pvalue == pytest.approx(0.05, abs=1e-9)


def test_t_interval_needs_two_values():
    assert report.t_interval([0.3]) is None
    assert report.t_interval([]) is None


def coverage(draw, mean: float, seeds: int, replicates: int = 20_000) -> float:
    """The share of `replicates` simulated sets of paired differences whose t interval holds `mean`."""
    low, high = report.t_bounds(draw((replicates, seeds)))
    return float(np.mean((low <= mean) & (mean <= high)))


@pytest.mark.parametrize("seeds", [3, 5, 10])
def test_t_interval_covers_95_percent_of_normal_and_skewed_differences(seeds):
    """Issue 23, item 2: coverage within [0.93, 0.97] at 3, 5 and 10 seeds, for normal differences
    and for skewed ones (a gamma of shape 9 shifted to mean 0.1: skewness 2/√9 = 0.67). Stronger
    skew undercovers; the next test pins the documented numbers. 20,000 replicates: the Monte Carlo
    error of a coverage is 0.0016."""
    rng = np.random.default_rng(seeds)
    assert 0.93 <= coverage(lambda shape: rng.normal(0.1, 0.3, shape), 0.1, seeds) <= 0.97
    assert 0.93 <= coverage(lambda shape: 0.1 + 0.1 * (rng.gamma(9.0, size=shape) - 9.0), 0.1, seeds) <= 0.97


@pytest.mark.parametrize(
    "shape, documented",
    [(9.0, (0.944, 0.943, 0.945)), (4.0, (0.936, 0.932, 0.938)), (2.0, (0.918, 0.916, 0.923)), (1.0, (0.884, 0.883, 0.900))],
)
def test_t_interval_coverage_of_skewed_differences_is_what_the_report_documents(shape, documented):
    """The coverages jaxdpo.report's docstring states for gamma-distributed differences (skewness
    2/√shape) at 3, 5 and 10 seeds, within 0.01 (six Monte Carlo standard errors)."""
    rng = np.random.default_rng(int(shape))
    for seeds, stated in zip((3, 5, 10), documented):
        assert coverage(lambda size: rng.gamma(shape, size=size), shape, seeds) == pytest.approx(stated, abs=0.01)
        assert f"{stated:.1%}" in report.__doc__


@settings(max_examples=25)
@given(st.lists(st.floats(-10, 10), min_size=1, max_size=8), st.floats(-5, 5))
def test_paired_difference_of_a_shifted_method_is_the_shift(baseline, shift):
    random = {seed: value for seed, value in enumerate(baseline)}
    same = report.paired_differences(random, random)
    assert same == [0.0] * len(baseline)
    assert report.t_interval(same) == (None if len(baseline) < 2 else (0.0, 0.0))  # one seed: no interval
    shifted = report.paired_differences({seed: value + shift for seed, value in random.items()}, random)
    assert np.mean(shifted) == pytest.approx(shift, abs=1e-9)
    interval = report.t_interval(shifted)
    assert (interval is None) == (len(baseline) < 2)
    assert interval is None or interval == pytest.approx((shift, shift), abs=1e-9)


def test_paired_differences_pair_by_seed_and_skip_unpaired_seeds():
    assert report.paired_differences({0: 1.0, 1: 2.0, 3: 5.0}, {1: 0.5, 0: 0.25, 2: 9.0}) == [0.75, 1.5]


def test_identical_methods_print_a_zero_difference_with_a_zero_width_interval():
    curves = [[0.1, 0.3, 0.2], [0.0, 0.5, 0.4], [0.2, 0.1, 0.6]]
    text = rendered(report.summary_table(make_rows({"activedpo": curves, "random": curves})))
    assert text.count("+0.000 [+0.000, +0.000]") == 2  # the final round and the AUC


def test_area_under_curve_is_the_normalized_trapezoid():
    # (16 * (0 + 1) / 2 + 16 * (1 + 0.5) / 2) / 32 = (8 + 12) / 32
    assert report.area_under_curve([0, 16, 32], [0.0, 1.0, 0.5]) == pytest.approx(0.625)
    assert report.area_under_curve([32, 0, 16], [0.5, 0.0, 1.0]) == pytest.approx(0.625)
    assert report.area_under_curve([0, 10, 40], [2.0, 2.0, 2.0]) == pytest.approx(2.0)
    assert report.area_under_curve([16], [1.0]) is None


def test_auc_per_seed_and_its_difference_in_the_table():
    rows = make_rows({"activedpo": [[0.0, 1.0, 0.5], [0.0, 0.0, 1.0]], "random": [[0.0, 0.0, 0.0], [0.0, 0.5, 0.5]]})
    tracks = report.points(rows)
    assert report.auc_per_seed(tracks["activedpo"]) == pytest.approx({0: 0.625, 1: 0.25})
    assert report.auc_per_seed(tracks["random"]) == pytest.approx({0: 0.0, 1: 0.375})
    text = rendered(report.summary_table(rows))
    areas = np.asarray([0.625, 0.25])
    assert f"{areas.mean():.3f} ± {areas.std(ddof=1) / np.sqrt(2):.3f}" in text
    difference_row = next(line for line in text.splitlines() if line.split()[:1] == ["activedpo"] and line.count("[") == 2)
    assert difference_row.split("]")[1].strip().startswith("+0.250")  # AUC: mean of (0.625 - 0) and (0.25 - 0.375)


def test_auc_skips_rounds_without_a_reward():
    rows = make_rows({"random": [[0.0, None, 1.0]]})
    assert report.auc_per_seed(report.points(rows)["random"]) == pytest.approx({0: 0.5})


def test_labels_to_reach_interpolates_the_first_crossing():
    labels = np.asarray([0.0, 16.0, 32.0, 48.0])
    curves = np.asarray([[0.0, 0.2, 0.6, 0.4], [0.5, 0.1, 0.2, 0.3], [0.0, 0.1, 0.1, 0.2]])
    got = report.labels_to_reach(labels, curves, np.asarray([0.4, 0.4, 0.4]))
    np.testing.assert_allclose(got, [16 + 16 * (0.4 - 0.2) / (0.6 - 0.2), 0.0, np.inf])  # crossing; at the start; never


@settings(max_examples=25)
@given(st.floats(0.01, 10), st.floats(0.0, 1.0))
def test_labels_to_reach_a_straight_line_is_its_inverse(slope, share):
    labels = np.arange(0, 81, 16, dtype=float)
    target = slope * 80 * share
    assert float(report.labels_to_reach(labels, slope * labels, np.asarray(target))) == pytest.approx(80 * share, rel=1e-9, abs=1e-9)


def test_labels_to_match_random_on_the_mean_curves_with_a_paired_bootstrap():
    rows = make_rows({
        "activedpo": [[0.0, 0.4, 0.5], [0.0, 0.2, 0.7], [0.0, 0.3, 0.6]],
        "random": [[0.0, 0.1, 0.3], [0.0, 0.2, 0.3], [0.0, 0.0, 0.3]],
        "aplp": [[0.0, 0.0, 0.1], [0.0, 0.1, 0.2], [0.0, 0.1, 0.1]],
    })
    tracks = report.points(rows)
    match = report.labels_to_match(tracks["activedpo"], tracks["random"])
    assert (match.target, match.budget) == (pytest.approx(0.3), 32)
    assert match.labels == pytest.approx(0.3 / 0.3 * 16)  # mean curve 0, 0.3, 0.6 reaches 0.3 at round 1
    assert np.isfinite(match.resamples).all() and match.resamples.min() >= 16 * 0.3 / 0.4 - 1e-9
    never = report.labels_to_match(tracks["aplp"], tracks["random"])
    assert never.labels == np.inf and np.isinf(never.resamples).all()
    text = rendered(report.summary_table(rows))
    assert "labels to match random's final mean reward (0.300 at 32 labels)" in " ".join(text.split())
    assert next(line for line in text.splitlines() if line.startswith(" aplp") and "not reached" in line)


def test_labels_to_match_needs_shared_seeds():
    tracks = report.points(make_rows({"activedpo": [[0.0, 0.4]], "random": [[0.0, 0.1], [0.0, 0.2]]}))
    tracks["activedpo"] = {7: tracks["activedpo"][0]}
    assert report.labels_to_match(tracks["activedpo"], tracks["random"]) is None


# -- tables ---------------------------------------------------------------------------------------


def test_one_seed_prints_the_mean_with_n1_instead_of_nan():
    """Issue 18, item 17: one seed printed "± nan"."""
    text = rendered(report.summary_table(make_rows({"activedpo": [[0.1, 0.3]], "random": [[0.1, 0.2]]})))
    assert "nan" not in text.lower()
    assert "0.300 (n=1)" in text and "+0.100 (n=1)" in text


def test_human_labeled_run_says_it_has_no_held_out_reward():
    """Issue 18, item 10: human-oracle runs ended with "nan ± nan"."""
    text = rendered(report.summary_table(human_rows()))
    assert "nan" not in text.lower()
    assert "no held-out reward" in text


def test_nan_values_count_as_missing():
    rows = make_rows({"activedpo": [[0.1, 0.4], [0.2, 0.5]], "random": [[0.1, 0.2], [0.2, 0.1]]})
    rows[-1]["eval_reward"] = float("nan")
    text = rendered(report.summary_table(rows))
    assert "nan" not in text.lower() and "(n=1)" in text


def test_a_run_without_random_says_so_instead_of_differences():
    text = rendered(report.summary_table(make_rows({"activedpo": [[0.1, 0.3]] * 2, "aplp": [[0.1, 0.2]] * 2})))
    assert "no 'random' method" in text and "− random" not in text


def test_missing_methods_seeds_and_rounds_do_not_crash(tmp_path):
    rows = make_rows({"activedpo": [[0.1, 0.3, 0.5], [0.2, 0.2]], "random": [[0.1, 0.2], [0.2, 0.1, 0.3]]})
    rows.append(dict(method="aplp", seed=0, round=0, labels=0, eval_reward=None))
    text = rendered(report.summary_table(rows))
    assert "nan" not in text.lower() and "aplp" in text and "(n=1)" in text
    assert report.plot_curves(rows, tmp_path / "curves.png") is not None


# -- plots ----------------------------------------------------------------------------------------


def test_curves_png_draws_the_curves_and_the_differences(tmp_path, saved_figures):
    rows = make_rows({"activedpo": [[0.1, 0.3, 0.5]] * 3, "random": [[0.1, 0.2, 0.25]] * 3})
    path = report.plot_curves(rows, tmp_path / "curves.png", title="demo")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    [figure] = saved_figures
    assert len(figure.axes) == 2 and finite_lines(figure) >= 3  # two reward curves, one difference


def with_guard(rows: list[dict]) -> list[dict]:
    """`rows` with a capability guard: the NLL rises and the KL grows by round (0 at round 0)."""
    return [dict(row, ref_nll=2.0 + 0.1 * row["round"] + 0.01 * row["seed"], kl_to_ref=0.5 * row["round"]) for row in rows]


def test_capability_guard_in_the_table_and_its_panels(tmp_path, saved_figures):
    rows = with_guard(make_rows({"activedpo": [[0.1, 0.3, 0.5]] * 3, "random": [[0.1, 0.2, 0.25]] * 3}))
    text = rendered(report.summary_table(rows))
    guard = next(line for line in text.splitlines() if line.startswith(" activedpo") and "2.210" in line)
    assert guard.split() == ["activedpo", "2.210", "±", "0.006", "2.010", "1.000", "±", "0.000"]  # final NLL, start, final KL
    report.plot_curves(rows, tmp_path / "curves.png")
    [figure] = saved_figures
    titles = [ax.get_title() for ax in figure.axes if ax.get_visible()]
    assert len(titles) == 4 and any("reference NLL" in t for t in titles) and any("KL" in t for t in titles)
    assert finite_lines(figure) == 2 + (1 + 1) + 2 + 2  # rewards, a difference and the zero line, NLLs, KLs


def test_human_labeled_run_still_shows_its_capability_guard(tmp_path, saved_figures):
    rows = with_guard(human_rows())
    assert "capability guard" in rendered(report.summary_table(rows))
    report.plot_curves(rows, tmp_path / "curves.png")
    [figure] = saved_figures
    assert sum(ax.get_visible() for ax in figure.axes) == 3  # training loss, NLL, KL


def test_human_labeled_run_plots_the_training_loss_not_an_empty_picture(tmp_path, saved_figures):
    """Issue 18, item 10: human-oracle runs wrote an empty curves.png."""
    path = report.plot_curves(human_rows(), tmp_path / "curves.png")
    assert path is not None and path.read_bytes().startswith(PNG_SIGNATURE)
    [figure] = saved_figures
    assert finite_lines(figure) == 2


def test_one_round_run_has_integer_label_ticks_and_a_title_that_says_what_it_shows(tmp_path, saved_figures):
    """Issue 24: one round of 16 labels drew ticks 15.2 … 16.8; the title was the config's name."""
    rows = [row for row in make_rows({"activedpo": [[0.1, 0.3]] * 2, "random": [[0.1, 0.2]] * 2}) if row["round"] == 1]
    report.plot_curves(rows, tmp_path / "curves.png", title="runs/one-round")
    report.plot_curves(human_rows(), tmp_path / "human.png")
    for figure in saved_figures:
        for ax in figure.axes:
            ticks = [tick for tick in ax.get_xticks() if ax.get_xlim()[0] <= tick <= ax.get_xlim()[1]]
            assert ticks and all(float(tick).is_integer() for tick in ticks), ticks
    titles = [figure.get_suptitle() for figure in saved_figures]
    assert titles == [f"{report.PLOT_TITLES[report.REWARD]}\nruns/one-round", report.PLOT_TITLES[report.TRAIN_LOSS]]


def test_nothing_to_plot_writes_nothing(tmp_path):
    rows = [dict(method="random", seed=0, round=0, labels=0, eval_reward=None)]
    assert report.plot_curves(rows, tmp_path / "curves.png") is None
    assert not (tmp_path / "curves.png").exists()


# -- reading metrics.jsonl ------------------------------------------------------------------------


def test_read_metrics_reads_nan_tokens_as_null(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"method": "random", "seed": 0, "round": 0, "labels": 0, "eval_reward": NaN}\n\n')
    assert report.read_metrics(path) == [dict(method="random", seed=0, round=0, labels=0, eval_reward=None)]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"method": "random", "seed": 0, "round": 0, "labels": 0}', "{not json"], r"metrics\.jsonl: line 2 is not valid JSON"),
        (['{"method": "random", "seed": "0", "round": 0, "labels": 0}'], r"line 1: field 'seed' must be an integer, got '0'"),
        (['{"method": "random", "round": 0, "labels": 0}'], r"line 1: missing field 'seed'"),
        (['[1, 2]'], r"line 1: expected a JSON object"),
        (['{"method": "random", "seed": 0, "round": 0, "labels": 0, "eval_reward": "high"}'], r"field 'eval_reward' must be a number"),
        (['{"method": "random", "seed": 0, "round": 1, "labels": 8}'] * 2, r"line 2 repeats method 'random' seed 0 round 1 of line 1"),
        ([], r"metrics\.jsonl: no rows"),
    ],
)
def test_read_metrics_names_the_file_and_line_of_bad_input(tmp_path, lines, message):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(ValueError, match=message):
        report.read_metrics(path)


# -- jaxdpo report --------------------------------------------------------------------------------


def test_jaxdpo_report_overlays_two_runs(tmp_path, capsys, saved_figures):
    first, second = tmp_path / "runs" / "first", tmp_path / "runs" / "second"
    write_metrics(first, make_rows({"activedpo": [[0.1, 0.3, 0.5]] * 2, "random": [[0.1, 0.2, 0.25]] * 2}))
    write_metrics(second, make_rows({"activedpo": [[0.0, 0.1]] * 3, "aplp": [[0.0, 0.2]] * 3}))
    out = tmp_path / "overlay.png"
    assert main(["report", str(first), str(second), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(first) in printed and str(second) in printed and "no 'random' method" in printed
    assert str(out) in printed and out.read_bytes().startswith(PNG_SIGNATURE)
    [figure] = saved_figures
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert sum(label.startswith(f"{first}: ") for label in legend) == 2
    assert sum(label.startswith(f"{second}: ") for label in legend) == 2


def test_jaxdpo_report_of_one_run_writes_its_curves_png(tmp_path, capsys):
    write_metrics(tmp_path, make_rows({"activedpo": [[0.1, 0.3]] * 2, "random": [[0.1, 0.2]] * 2}))
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "difference to random" in capsys.readouterr().out


def test_jaxdpo_report_says_why_it_writes_no_plot(tmp_path, capsys):
    write_metrics(tmp_path, [dict(method="random", seed=0, round=0, labels=0, eval_reward=None)])
    assert main(["report", str(tmp_path)]) == 0
    assert "not written" in capsys.readouterr().out and not (tmp_path / "curves.png").exists()


def test_jaxdpo_report_without_metrics_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "typo")]) == EXIT_CONFIG
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "typo/metrics.jsonl" in error and "\n" not in error


def test_jaxdpo_report_to_a_missing_folder_is_a_one_line_error(tmp_path, capsys):
    write_metrics(tmp_path, make_rows({"random": [[0.1, 0.2]]}))
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "missing" / "curves.png")]) == EXIT_CONFIG
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "missing/curves.png" in error and "\n" not in error
