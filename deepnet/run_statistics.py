"""The statistics of the analysis: descriptive statistics over runs, curves over runs of different lengths, and
the tests that compare each spec with the reference (Welch, Mann-Whitney, paired t, Wilcoxon, Holm, Hedges' g).
The definitions are in deepnet_analysis.py's docstring.
"""
import math
import warnings

import numpy as np
from scipy import stats

P_VALUES = ("welch_p", "mannwhitney_p", "paired_t_p", "wilcoxon_p")   # each Holm-adjusted over the specs
CONFIDENCE = 0.95
NO_SPREAD = 1e-12                  # paired differences that differ by no more than this are all the same


def describe(values):
    """median, mean, var, std, max, min of values (var/std with ddof 0, numpy's default)."""
    a = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(a)), "mean": float(np.mean(a)), "var": float(np.var(a)),
            "std": float(np.std(a)), "max": float(np.max(a)), "min": float(np.min(a))}


def without_repeated_validations(mbs, *series):
    """The original's __remove_double_logs: of repeated validation minibatches keep the first entry."""
    seen, keep = set(), []
    for i, mb in enumerate(mbs):
        if mb not in seen:
            seen.add(mb)
            keep.append(i)
    return [mbs[i] for i in keep], *[[values[i] for i in keep] for values in series]


def on_common_grid(series):
    """[(mbs, values)] -> (grid, matrix runs x grid) over the union of minibatches, NaN where absent."""
    grid = np.array(sorted({int(mb) for mbs, _ in series for mb in mbs}), dtype=np.int64)
    matrix = np.full((len(series), len(grid)), math.nan)
    for row, (mbs, values) in enumerate(series):
        count = min(len(mbs), len(values))
        matrix[row, np.searchsorted(grid, np.asarray(mbs[:count], np.int64))] = values[:count]
    return grid, matrix


def band(matrix):
    """Mean, min and max over runs, ignoring NaN (every column has a value)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(matrix, 0), np.nanmin(matrix, 0), np.nanmax(matrix, 0)


def over_runs(series):
    """The original's __get_statistics for [(minibatches, values)] per run: curves over runs and per-run max/min.

    Runs are put on the union of their minibatches (NaN where a run has no value); with runs of equal length
    this is the original's runs x values array.
    """
    grid, matrix = on_common_grid(series)
    if matrix.size == 0:
        nan_run, nan_list = np.full(len(grid), math.nan), [math.nan] * len(series)
        return {"mb": grid, **{f"{name}_run": nan_run for name in
                               ("median", "himax", "lomax", "himin", "lomin", "mean", "std", "var")},
                "run_max_list": nan_list, "run_min_list": list(nan_list)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        run_max, run_min = np.nanmax(matrix, 1), np.nanmin(matrix, 1)
        mean, std, var = np.nanmean(matrix, 0), np.nanstd(matrix, 0), np.nanvar(matrix, 0)
    median_index = np.argsort(run_min)[len(run_min) // 2]
    return {"mb": grid, "median_run": matrix[median_index], "himax_run": matrix[np.argmax(run_max)],
            "lomax_run": matrix[np.argmin(run_max)], "himin_run": matrix[np.argmax(run_min)],
            "lomin_run": matrix[np.argmin(run_min)], "mean_run": mean, "std_run": std, "var_run": var,
            "run_max_list": [float(v) for v in run_max], "run_min_list": [float(v) for v in run_min]}


def list_statistics(prefix, values):
    """{prefix_list, prefix_median, _max, _min, _mean, _var, _std} as the original computes them (numpy)."""
    return {f"{prefix}_list": list(values), f"{prefix}_median": np.median(values), f"{prefix}_max": np.max(values),
            f"{prefix}_min": np.min(values), f"{prefix}_mean": np.mean(values), f"{prefix}_var": np.var(values),
            f"{prefix}_std": np.std(values)}


def holm(pvalues):
    """Holm-Bonferroni adjusted p values (same order); NaN entries stay NaN and are not counted.

    Sorted ascending p_(1) <= ... <= p_(m): adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).
    """
    p = np.asarray(pvalues, dtype=np.float64)
    adjusted = np.full(p.shape, math.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = len(valid)
    running = 0.0
    for rank, index in enumerate(valid[np.argsort(p[valid], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def hedges_g(a, b):
    """Hedges' g of a against b with the small-sample correction J = 1 - 3 / (4 (n1 + n2) - 9)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n1, n2 = len(a), len(b)
    if n1 < 2 or n2 < 2:
        return math.nan
    pooled = math.sqrt(((n1 - 1) * np.var(a, ddof=1) + (n2 - 1) * np.var(b, ddof=1)) / (n1 + n2 - 2))
    if pooled == 0:
        return math.nan
    return (1 - 3 / (4 * (n1 + n2) - 9)) * (np.mean(a) - np.mean(b)) / pooled


def welch_interval(a, b, confidence=CONFIDENCE):
    """Welch-Satterthwaite t interval of mean(a) - mean(b); NaNs for n < 2 or no spread at all."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n1, n2 = len(a), len(b)
    if n1 < 2 or n2 < 2:
        return math.nan, math.nan
    v1, v2 = np.var(a, ddof=1) / n1, np.var(b, ddof=1) / n2
    if v1 + v2 == 0:
        return math.nan, math.nan
    df = (v1 + v2) ** 2 / (v1 ** 2 / (n1 - 1) + v2 ** 2 / (n2 - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * math.sqrt(v1 + v2)
    diff = float(np.mean(a) - np.mean(b))
    return diff - half, diff + half


def compare(a, b):
    """Mean difference with its Welch interval, Welch and Mann-Whitney p values, Hedges' g of a against b."""
    welch_p = mannwhitney_p = math.nan
    if len(a) >= 2 and len(b) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            welch_p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
        mannwhitney_p = float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)
    low, high = welch_interval(a, b)
    return {"mean_diff": float(np.mean(a) - np.mean(b)), "mean_diff_ci_low": low, "mean_diff_ci_high": high,
            "welch_p": welch_p, "mannwhitney_p": mannwhitney_p, "hedges_g": hedges_g(a, b)}


def compare_paired(a, b):
    """Paired t-test and Wilcoxon signed-rank test (both two-sided) of a against b over the run numbers both
    have: {run: value} each. NaN p values with fewer than 2 pairs; the t-test also when every difference is the
    same (to NO_SPREAD), the Wilcoxon test when every difference is 0."""
    pairs = sorted(set(a) & set(b))
    x, y = np.array([a[run] for run in pairs], np.float64), np.array([b[run] for run in pairs], np.float64)
    differences = x - y
    t_p = wilcoxon_p = math.nan
    if len(pairs) >= 2 and np.ptp(differences) > NO_SPREAD:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            t_p = float(stats.ttest_rel(x, y).pvalue)
    if len(pairs) >= 2 and np.any(differences != 0):
        wilcoxon_p = float(stats.wilcoxon(x, y).pvalue)
    return {"n_pairs": len(pairs), "paired_t_p": t_p, "wilcoxon_p": wilcoxon_p}


def significance_rows(test_accs, reference):
    """One row per spec other than the reference, Holm-adjusted over those rows; test_accs: spec -> {run: test
    acc} (paired tests match runs by number: run k of every spec shares its seed)."""
    ref = test_accs[reference]
    rows = []
    for spec, by_run in test_accs.items():
        if spec != reference:
            values, ref_values = list(by_run.values()), list(ref.values())
            rows.append({"spec_name": spec, "reference": reference, "n": len(values), "n_reference": len(ref),
                         **compare(values, ref_values), **compare_paired(by_run, ref)})
    for key in P_VALUES:
        for row, adjusted in zip(rows, holm([row[key] for row in rows])):
            row[f"{key}_holm"] = float(adjusted)
    return rows
