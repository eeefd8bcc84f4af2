"""Run reports: the summary tables and `curves.png`, from a run's metrics rows (one per method, seed
and round; `read_metrics` reads them back from `metrics.jsonl`). Reading: `metrics`; the
statistics: `statistics`; the tables: `tables`; the plot: `plots`.

Every statistic is over seeds. The tracks of one seed share their prompts, so methods are compared
seed by seed:

- **Reward**: per method and round, the mean held-out reward over seeds ± its standard error
  (sample s.d. / √n). With one seed the mean is shown alone, marked "n=1".
- **Paired difference to `random`**: per method and round t, dₛ = reward(method, s, t) −
  reward(random, s, t) for every seed s that both have; shown as mean(d) with a 95% Student-t
  interval, mean(d) ± t₀.₉₇₅,ₙ₋₁ · s(d)/√n (s: sample s.d., divisor n − 1). It treats seeds as
  independent draws. Its coverage is exactly 95% when the dₛ are normal, for any n ≥ 2; it is
  lower when they are skewed, and the alternatives tried do no better at these n. Simulated
  at n = 3 / 5 / 10 seeds (100,000 replicates each), it covers 94.9% / 94.9% / 95.1% of normal
  dₛ, 94.4% / 94.3% / 94.5% of dₛ with skewness 0.67 (a gamma of shape 9), 93.6% / 93.2% / 93.8%
  with skewness 1 (shape 4), 91.8% / 91.6% / 92.3% with skewness 1.41 (shape 2) and 88.4% /
  88.3% / 90.0% with skewness 2 (an exponential); `tests/test_report.py` re-checks these numbers.
  (The percentile bootstrap this report used before covers 75% of normal dₛ at 3 seeds, 83% at 5
  and 91% at 10; BCa covers 71% at 3 and 84% at 5; Johnson's skewness-corrected t covers no
  more than the plain t of skewed dₛ at these n.) The table shows the final round and the AUC;
  every round's mean difference follows, and curves.png draws each round's interval as a band.
  With one seed there is no interval.
- **Area under the curve (AUC)**: per seed, the trapezoid of reward over labels collected,
  divided by the span of labels (last − first): the curve's mean reward over the labeling budget,
  in reward units (a flat curve at r has AUC r), so runs with other budgets stay comparable. Rounds
  without a reward are skipped (the trapezoid bridges them); a seed with fewer than two rounds has
  no AUC; a seed that stopped early is averaged over its own shorter budget. Shown as mean ± s.e.
  over seeds, and as a paired difference to `random` with the same t interval.
- **Labels to match `random`**: the target is random's final mean reward over seeds; a method's
  number is the label count at which its mean curve over seeds first reaches the target, by linear
  interpolation between the two rounds around the crossing ("not reached" when no round does),
  also as a share of random's own budget. Both curves use the seeds the two methods share and the
  rounds every one of those seeds has. Its spread: the same number for `BOOTSTRAP_RESAMPLES`
  bootstrap resamples of those seeds (drawn with replacement, the same seeds for both methods,
  target recomputed; NumPy's default generator seeded with `BOOTSTRAP_SEED`, so a report is
  reproducible), shown as the 2.5th–97.5th percentiles and the share of resamples that reach the
  target at all. With 3–5 seeds this range describes the seed-to-seed spread; it is not a
  calibrated interval (a bootstrap over so few seeds is too narrow, see above).
- **Capability guard** (`ref_nll`, `kl_to_ref`; computed by `jaxdpo.experiment.evaluation`): the
  final round's mean ± s.e. over seeds of the policy's mean per-token NLL of held-out reference
  responses (next to its round-0 value, the initial model's) and of the Monte Carlo estimate of
  KL(π_θ ‖ π_ref); every round in curves.png. A reward that rises while the NLL rises and the KL
  grows is reward bought with capability (Oh et al., "Random Is Hard to Beat").

A missing value (a null field, NaN, a method without some seeds or rounds) is left out of every
statistic; counts below the run's number of seeds are shown as "(n=k)". Runs without any held-out
reward (human labels: people do not score held-out answers) get a table that says so and a
`curves.png` of the DPO training loss instead.
"""

from jaxdpo.report.metrics import KL_TO_REF, REF_NLL, REWARD, TRAIN_LOSS, Tracks, at_round, points, read_metrics, read_run, values_by_round
from jaxdpo.report.plots import NOTHING_TO_PLOT, PLOT_TITLES, plot_curves, plot_runs
from jaxdpo.report.statistics import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CONFIDENCE,
    RANDOM,
    LabelsToMatch,
    area_under_curve,
    auc_per_seed,
    differences_by_round,
    labels_to_match,
    labels_to_reach,
    mean_stderr,
    paired_differences,
    t_bounds,
    t_interval,
)
from jaxdpo.report.tables import NO_REWARD, format_difference, format_mean_stderr, summary_table

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "BOOTSTRAP_SEED",
    "CONFIDENCE",
    "KL_TO_REF",
    "NOTHING_TO_PLOT",
    "NO_REWARD",
    "PLOT_TITLES",
    "RANDOM",
    "REF_NLL",
    "REWARD",
    "TRAIN_LOSS",
    "LabelsToMatch",
    "Tracks",
    "area_under_curve",
    "at_round",
    "auc_per_seed",
    "differences_by_round",
    "format_difference",
    "format_mean_stderr",
    "labels_to_match",
    "labels_to_reach",
    "mean_stderr",
    "paired_differences",
    "plot_curves",
    "plot_runs",
    "points",
    "read_metrics",
    "read_run",
    "summary_table",
    "t_bounds",
    "t_interval",
    "values_by_round",
]
