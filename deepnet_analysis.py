"""Analysis of one experiment: the original's performance tables, significance tests, plots, one-page report.

Reads only the recorders EXP/<spec>/run_<run>/record_<spec>_run_<run>.pkl (for the activation shapes of old
recorders also the AF-weight files in EXP/0_af_weights/) and writes everything into EXP/0_analysis/; the last
line printed is the path of 0_analysis/report.html, the page to open.

Which runs are analysed. A run is left out, and listed with the reason in 0_analysis/excluded_runs.csv
(columns spec_name; run; category; reason; recorder), when
    no_recorder / unreadable   its recorder is missing or cannot be read
    diverged                   diverged is True but test_completed is not (diverged under an older suite: run it
                               again and it is tested)
    incomplete                 test_completed is not True (or it has no early_stopping_mb / test_top1)
    bad_test_acc               its test accuracy lies in (0, 0.3): the original's "bad run" rule
A run that diverged (its loss turned non-finite at diverged_at_mb) and was tested is analysed like any other, as
in the original: its validations from the divergence on count as 0, so early stopping picked a checkpoint
before it, and that checkpoint was tested. It is named in the "diverged runs" column and in the report.
A run without a validation set (settings create_val_set False) validated on the test set, for monitoring only:
its validations are ignored here, so its val columns are empty and nothing is picked on the test set.
As in the original, a run whose mean validation accuracy (mean of val_top1_hist over the whole run) is above
0.95 or below 0.3 only gets a printed warning: the original prints "excluded" but keeps the run, so it is kept.
An experiment without any complete run is a UserError; one whose complete runs are all bad is analysed (empty
table, every run listed with its reason in excluded_runs.csv and the report). An experiment whose complete runs
of one task and preprocessing were trained on different data (their recorded data fingerprints differ), or whose
runs with one seed and split settings on different splits, is a UserError too: such runs are not comparable.

main_performance_analysis.csv, ';'-separated, one row per spec with an analysed run; the original's columns first:
    spec_name; n_runs                              n_runs = analysed runs
    test / e.s. mb [mean]; [std]                   over the runs' test_mb_n_hist entries (the tested minibatch)
    train acc [median; mean; var; std; max; min]   over the runs of EACH RUN'S MAXIMUM of train_top1_hist (per
                                                   training minibatch) over the whole run
    val acc   [...]                                the same with val_top1_hist (repeated validation minibatches
                                                   dropped first, keeping the first, as the original did)
    test acc  [...]                                over the runs' test_top1 (the model at early_stopping_mb)
then the suite's extra columns (values at the tested minibatch, not in the original):
    train acc at e.s. mb [median; ...; min]   per run: mean of train_top1 over the training minibatches
                                              es-val_every+1 .. es (val_every from the settings, else the
                                              spacing of val_mb_n_hist); NaN when es is 0
    val acc at e.s. mb [median; ...; min]     per run: raw val_top1 at es (or the last validation before it)
    diverged runs                             'run 3 diverged at mb 1234, ...' for the analysed runs that diverged
Every var/std in this file is the population statistic (ddof 0, numpy's default, as in the original), so a
single run has std 0. NaN is written 'nan'; an empty cell has no value (the val columns of a spec without a
validation set). Accuracies are fractions in [0, 1].

performance_summary_<spec>.pkl: the original's dictionary (same keys: spec_name, n_runs, t_/v_loss_run_min_list and
t_/v_top1_run_max_list with their _median/_max/_min/_mean/_var/_std, the curves over runs on t_mb / v_mb:
t_/v_loss_{median,himin,lomin,mean,std,var}_run and t_/v_top1_{median,himax,lomax,mean,std,var}_run,
test_top1_*, test_loss_* (list and statistics), test_mb_n_hist/_min/_max/_mean/_median/_std),
plus the suite's keys: runs, early_stopping_mb, train_acc / val_acc / test_acc (values at the tested minibatch)
with *_acc_stats, val_curve (mean/min/max of val_top1 per minibatch), excluded, warnings, significance,
definitions. As in the original, *_median_run is the run whose MINIMUM is the median of the runs' minima (also
for accuracies); runs of different length are put on the union of their minibatches with NaN where a run has
no value (the original needed equal lengths), and the curves over runs ignore those NaN.

significance.csv, each spec's test acc against the reference spec's (sample statistics, ddof 1):
    mean_diff                        mean(spec) - mean(reference)
    mean_diff_ci_low / _high         95 % Welch-Satterthwaite t interval of mean_diff:
                                     mean_diff -+ t_{0.975, df} * se, se^2 = s1^2/n1 + s2^2/n2,
                                     df = se^4 / ((s1^2/n1)^2/(n1-1) + (s2^2/n2)^2/(n2-1))
    welch_p                          two-sided Welch t-test (scipy.stats.ttest_ind, equal_var=False)
    mannwhitney_p                    two-sided Mann-Whitney U test (scipy.stats.mannwhitneyu, method 'auto')
    *_holm                           Holm-Bonferroni step-down adjustment over all specs with a p value
    hedges_g                         J * (mean_spec - mean_ref) / s_pooled, s_pooled^2 = ((n1-1) s1^2 + (n2-1)
                                     s2^2) / (n1 + n2 - 2), J = 1 - 3 / (4 (n1 + n2) - 9)
    n_pairs                          runs matched by run number (run k of every spec shares its seed: the same
                                     split, minibatch order, dropout masks and initial weights)
    paired_t_p                       two-sided paired t-test over the pairs (scipy.stats.ttest_rel)
    wilcoxon_p                       two-sided Wilcoxon signed-rank test over the pairs (scipy.stats.wilcoxon:
                                     zero differences dropped, exact for small samples)
A spec (or a reference) with fewer than 2 runs gets NaN p values, interval and g (so does a pair of specs whose
runs all have the same test accuracy); fewer than 2 pairs give NaN paired p values, as do differences that are
all the same (t-test) or all 0 (Wilcoxon); NaN p values do not count towards the Holm correction. Every test is
Holm-corrected on its own.
"""
import io
import math
import os
import re
import warnings

import matplotlib
matplotlib.use("Agg")
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

import deepnet_network as net  # noqa: E402
import deepnet_report  # noqa: E402
from deepnet_task_cifar import data_change, settings_as_started, split_change, write_hparams_config  # noqa: E402
from deepnet_util import UserError, atomic_write_bytes, load_pickle, save_pickle, save_text  # noqa: E402

STAT_NAMES = ("median", "mean", "var", "std", "max", "min")
AT_ES_KINDS = ("train", "val")
SIGNIFICANCE_COLUMNS = ("spec_name", "reference", "n", "n_reference", "mean_diff", "mean_diff_ci_low",
                        "mean_diff_ci_high", "welch_p", "mannwhitney_p", "welch_p_holm", "mannwhitney_p_holm",
                        "hedges_g", "n_pairs", "paired_t_p", "wilcoxon_p", "paired_t_p_holm", "wilcoxon_p_holm")
P_VALUES = ("welch_p", "mannwhitney_p", "paired_t_p", "wilcoxon_p")   # each Holm-adjusted over the specs
EXCLUDED_COLUMNS = ("spec_name", "run", "category", "reason", "recorder")
BAD_TEST_ACC = (0.0, 0.3)          # the original's bad-run rule: test acc in this open interval -> excluded
VAL_MEAN_WARNING = (0.3, 0.95)     # the original's warning: mean val acc of the run outside this interval
CONFIDENCE = 0.95
NO_SPREAD = 1e-12                  # paired differences that differ by no more than this are all the same
AF_X = np.linspace(-3.0, 3.0, 241)


# ---------------------------------------------------------------- finding and reading runs

def spec_folders(exp_dir):
    """Spec names of an experiment: its sub-folders except the 0_* ones, sorted."""
    return sorted(name for name in os.listdir(exp_dir)
                  if os.path.isdir(os.path.join(exp_dir, name)) and not name.startswith("0_"))


def run_numbers(exp_dir, spec):
    """Run numbers of the run_<n> folders of a spec, sorted."""
    found = []
    for name in os.listdir(os.path.join(exp_dir, spec)):
        match = re.fullmatch(r"run_(\d+)", name)
        if match and os.path.isdir(os.path.join(exp_dir, spec, name)):
            found.append(int(match.group(1)))
    return sorted(found)


def recorder_path(exp_dir, spec, run):
    return os.path.join(exp_dir, spec, f"run_{run}", f"record_{spec}_run_{run}.pkl")


def check_run(exp_dir, spec, run):
    """(recorder, None, None) for a complete run, else (None, category, reason)."""
    path = recorder_path(exp_dir, spec, run)
    if not os.path.exists(path):
        return None, "no_recorder", "no recorder file"
    try:
        record = load_pickle(path)
    except UserError as err:
        return None, "unreadable", f"unreadable recorder ({err})"
    if not isinstance(record, dict):
        return None, "unreadable", "unreadable recorder (not a dict)"
    if not record.get("test_completed") and record.get("diverged"):
        return None, "diverged", (f"diverged at minibatch {record.get('diverged_at_mb')}, not tested (run it "
                                  "again: it retrains to there and tests the best checkpoint before it)")
    if not record.get("test_completed"):
        trained = record.get("mb_count_total")
        total = (record.get("settings") or {}).get("n_minibatches")
        return None, "incomplete", f"incomplete: test not done (trained {trained} of {total} minibatches)"
    if tested_mb(record) is None or record.get("test_top1") is None:
        return None, "incomplete", "recorder has no early_stopping_mb or test_top1"
    record["settings"] = settings_as_started(record.get("settings") or {})
    return record, None, None


def first_settings(exp_dir, spec):
    """The settings of the spec's first run with a complete recorder, bad runs included (None if none)."""
    for run in run_numbers(exp_dir, spec):
        record, _, _ = check_run(exp_dir, spec, run)
        if record is not None:
            return record.get("settings") or {}
    return None


def tested_mb(record):
    """The minibatch of the tested model: early_stopping_mb, else the last test_mb_n_hist entry."""
    if record.get("early_stopping_mb") is not None:
        return int(record["early_stopping_mb"])
    history = record.get("test_mb_n_hist") or []
    return int(history[-1]) if history else None


def bad_test_reason(record):
    """The original's bad-run rule (test acc in (0, 0.3)): the reason, or None for a good run."""
    acc = float(record["test_top1"])
    if BAD_TEST_ACC[0] < acc < BAD_TEST_ACC[1]:
        return f"bad run: test accuracy {acc:.6g} lies in ({BAD_TEST_ACC[0]:g}, {BAD_TEST_ACC[1]:g})"
    return None


def validation_history(record):
    """(minibatches, top1, loss) of the run's validations; all empty for a run without a validation set (it
    validated on the test set, for monitoring only: never a val column, never a pick)."""
    if not has_validation_set(record):
        return [], [], []
    return (record.get("val_mb_n_hist") or [], record.get("val_top1_hist") or [],
            record.get("val_loss_hist") or [])


def has_validation_set(record):
    """Whether the run validated on a validation set (settings create_val_set; recorders without it: yes)."""
    return bool((record.get("settings") or {}).get("create_val_set", True))


def val_mean_warning(spec, run, record):
    """The original's warning for a mean validation accuracy outside [0.3, 0.95] (the run is kept), or None."""
    mbs, values, _ = validation_history(record)
    if not mbs or not values:
        return None
    mean = float(np.mean(values))
    if VAL_MEAN_WARNING[0] <= mean <= VAL_MEAN_WARNING[1]:
        return None
    side = f"below {VAL_MEAN_WARNING[0]:g}" if mean < VAL_MEAN_WARNING[0] else f"above {VAL_MEAN_WARNING[1]:g}"
    return (f"warning: {spec} run {run}: mean validation accuracy over the whole run is {mean:.6g}, {side} "
            "(kept: the original only warns)")


def load_spec(exp_dir, spec, out):
    """(runs, records, excluded rows, warnings) of a spec; exclusions and warnings are also sent to out."""
    runs, records, excluded, notes = [], [], [], []

    def exclude(run, category, reason):
        out(f"excluded: {spec} run {run}: {reason}")
        excluded.append({"spec_name": spec, "run": run, "category": category, "reason": reason,
                         "recorder": recorder_path(exp_dir, spec, run)})

    for run in run_numbers(exp_dir, spec):
        record, category, reason = check_run(exp_dir, spec, run)
        if record is None:
            exclude(run, category, reason)
            continue
        warning = val_mean_warning(spec, run, record)
        if warning:
            out(warning)
            notes.append(warning)
        reason = bad_test_reason(record)
        if reason:
            exclude(run, "bad_test_acc", reason)
            continue
        runs.append(run)
        records.append(record)
    return runs, records, excluded, notes


def check_same_data(exp_dir, specs):
    """UserError naming the recorder of a complete run trained on other data than an earlier run of the same task
    and preprocessing, or on another split than an earlier run with the same seed and split settings (runs that
    recorded no data fingerprint are not compared). Reads each recorder once more, one at a time, so that a
    refusal comes before anything is written."""
    first = {}
    for spec in specs:
        for run in run_numbers(exp_dir, spec):
            record, _, _ = check_run(exp_dir, spec, run)
            fingerprint, settings = (record or {}).get("data_fingerprint"), (record or {}).get("settings") or {}
            if not fingerprint:
                continue
            path = recorder_path(exp_dir, spec, run)
            data = (settings.get("task"), settings.get("preprocessing"))
            split = (*data, *(settings.get(key) for key in ("seed", "create_val_set", "val_set_fraction",
                                                             "minibatch_size")))
            other_data, before = first.setdefault(data, (path, fingerprint))
            for key in ("train", "test"):
                change = data_change(before[key], fingerprint[key])
                if change:
                    raise UserError(f"{path}: trained on other data than {other_data} ({fingerprint[key]['file']}: "
                                    f"{change}); analyse runs of one dataset together")
            other_split, before = first.setdefault(split, (path, fingerprint))
            change = split_change(before["split"], fingerprint["split"])
            if change:
                raise UserError(f"{path}: trained on another split than {other_split} ({change})")


# ---------------------------------------------------------------- per-run numbers at the tested minibatch

def val_every(record):
    """settings['val_every'], else the spacing of val_mb_n_hist (None if unknown)."""
    value = (record.get("settings") or {}).get("val_every")
    if value:
        return int(value)
    mbs = record.get("val_mb_n_hist") or []
    return int(mbs[1] - mbs[0]) if len(mbs) > 1 else None


def val_acc_at(record, mb):
    """Raw val_top1 at minibatch mb (or at the last validation before it); NaN if none."""
    best = None
    mbs, top1, _ = validation_history(record)
    for i, val_mb in enumerate(mbs):
        if val_mb <= mb and i < len(top1):
            best = i
    return float(top1[best]) if best is not None else math.nan


def train_acc_at(record, mb, window):
    """Mean train_top1 over the training minibatches mb-window+1 .. mb; NaN if there are none."""
    if not window:
        return math.nan
    values = [acc for n, acc in zip(record.get("train_mb_n_hist") or [], record.get("train_top1_hist") or [])
              if mb - window < n <= mb]
    return float(np.mean(values)) if values else math.nan


def run_metrics(record):
    mb = tested_mb(record)
    return {"early_stopping_mb": mb, "test_acc": float(record["test_top1"]),
            "val_acc": val_acc_at(record, mb), "train_acc": train_acc_at(record, mb, val_every(record))}


# ---------------------------------------------------------------- statistics

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


def curve_keys(prefix, curves, names):
    return {f"{prefix}_{name}_run": curves[f"{name}_run"] for name in names}


def original_summary(spec, records):
    """The original __spec_analysis's performance dictionary for the analysed runs of a spec."""
    train, val = [], []
    for record in records:
        train.append((record.get("train_mb_n_hist") or [], record.get("train_top1_hist") or [],
                      record.get("train_loss_hist") or []))
        val.append(without_repeated_validations(*validation_history(record)))
    t_top1 = over_runs([(mbs, top1) for mbs, top1, _ in train])
    t_loss = over_runs([(mbs, loss) for mbs, _, loss in train])
    v_top1 = over_runs([(mbs, top1) for mbs, top1, _ in val])
    v_loss = over_runs([(mbs, loss) for mbs, _, loss in val])
    test_mbs = [list(r.get("test_mb_n_hist") or [tested_mb(r)]) for r in records]
    flat_mbs = np.concatenate([np.asarray(mbs, np.float64) for mbs in test_mbs])
    loss_names = ("median", "himin", "lomin", "mean", "std", "var")
    top1_names = ("median", "himax", "lomax", "mean", "std", "var")
    test_loss = [math.nan if r.get("test_loss") is None else float(r["test_loss"]) for r in records]
    return {
        "spec_name": spec, "n_runs": len(records),
        "t_mb": t_top1["mb"],
        **list_statistics("t_loss_run_min", t_loss["run_min_list"]), **curve_keys("t_loss", t_loss, loss_names),
        **list_statistics("t_top1_run_max", t_top1["run_max_list"]), **curve_keys("t_top1", t_top1, top1_names),
        "v_mb": v_top1["mb"],
        **list_statistics("v_loss_run_min", v_loss["run_min_list"]), **curve_keys("v_loss", v_loss, loss_names),
        **list_statistics("v_top1_run_max", v_top1["run_max_list"]), **curve_keys("v_top1", v_top1, top1_names),
        **list_statistics("test_loss", test_loss),
        **list_statistics("test_top1", [float(r["test_top1"]) for r in records]),
        "test_mb_n_hist": test_mbs, "test_mb_n_min": np.amin(flat_mbs), "test_mb_n_max": np.amax(flat_mbs),
        "test_mb_n_mean": np.mean(flat_mbs), "test_mb_n_median": np.median(flat_mbs),
        "test_mb_n_std": np.std(flat_mbs),
    }


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


# ---------------------------------------------------------------- tables

def format_value(value):
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else repr(float(value))
    return str(value)


def write_csv(path, columns, rows):
    """A ';'-separated table with a header line; NaN is written as 'nan'."""
    lines = [";".join(columns)]
    lines += [";".join(format_value(row[column]) for column in columns) for row in rows]
    save_text(path, "\n".join(lines) + "\n")


def performance_columns():
    """The original's columns in its order, then the suite's values at the early-stopping minibatch."""
    columns = ["spec_name", "n_runs", "test / e.s. mb [mean]", "test / e.s. mb [std]"]
    for kind in ("train", "val", "test"):
        columns += [f"{kind} acc [{name}]" for name in STAT_NAMES]
    for kind in AT_ES_KINDS:
        columns += [f"{kind} acc at e.s. mb [{name}]" for name in STAT_NAMES]
    return columns + ["diverged runs"]


def performance_row(summary, metrics, records):
    """One main_performance_analysis.csv row from the original summary and the per-run metrics at es. The val
    columns are empty when no run of the spec had a validation set."""
    row = {"spec_name": summary["spec_name"], "n_runs": summary["n_runs"],
           "test / e.s. mb [mean]": float(summary["test_mb_n_mean"]),
           "test / e.s. mb [std]": float(summary["test_mb_n_std"])}
    for kind, prefix in (("train", "t_top1_run_max"), ("val", "v_top1_run_max"), ("test", "test_top1")):
        for name in STAT_NAMES:
            row[f"{kind} acc [{name}]"] = float(summary[f"{prefix}_{name}"])
    for kind in AT_ES_KINDS:
        for name, value in describe([m[f"{kind}_acc"] for m in metrics]).items():
            row[f"{kind} acc at e.s. mb [{name}]"] = value
    if not any(has_validation_set(record) for record in records):
        row.update({key: None for key in row if key.startswith("val acc")})
    row["diverged runs"] = ", ".join(f"run {record['run']} diverged at mb {record['diverged_at_mb']}"
                                     for record in records if record.get("diverged"))
    return row


# ---------------------------------------------------------------- curves across runs

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


def val_curves(records):
    return on_common_grid([validation_history(r)[:2] for r in records])


# ---------------------------------------------------------------- plots

def new_figure(n_panels=1, width=5.0, height=3.6, ncols=3):
    ncols = min(ncols, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows))
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def save_figure(fig, path):
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_all_specs(curves, path, experiment):
    fig, (ax,) = new_figure(width=8, height=5)
    for spec, (grid, mean, _, _) in curves.items():
        ax.plot(grid, mean, label=spec, lw=1.2)
    ax.set(xlabel="minibatch", ylabel="validation accuracy (mean over runs)", title=experiment)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def plot_spec_performance(spec, curve, n_runs, path):
    grid, mean, low, high = curve
    fig, (ax,) = new_figure(width=7, height=4.5)
    ax.fill_between(grid, low, high, alpha=0.3, label="worst..best run")
    ax.plot(grid, mean, lw=1.5, label=f"mean of {n_runs} runs")
    ax.set(xlabel="minibatch", ylabel="validation accuracy", title=f"{spec}: validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_all_runs(spec, runs, records, path):
    fig, (ax,) = new_figure(width=7, height=4.5)
    for run, record in zip(runs, records):
        ax.plot(*validation_history(record)[:2], lw=0.8, label=f"run {run}")
    ax.set(xlabel="minibatch", ylabel="validation accuracy", title=f"{spec}: every run")
    ax.grid(alpha=0.3)
    if len(runs) <= 12:
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def layer_order(record, names):
    """Activated layers in network order when the network is known, else in the given order."""
    network = (record.get("settings") or {}).get("network")
    if network in net.ARCHITECTURES:
        known = [name for name in net.activated_layers(network) if name in names]
        return known + [name for name in names if name not in known]
    return list(names)


def tested_af_weights(exp_dir, spec, run, record):
    """layer -> AF weights of the tested model: recorder['test_af_weights'], else (old recorders) the
    suite's old AF-weights file of the tested minibatch, else the recorder's history at that minibatch."""
    if record.get("test_af_weights"):
        return record["test_af_weights"]
    mb = tested_mb(record)
    path = net.af_weights_path(exp_dir, spec, run, mb)
    if os.path.exists(path):
        try:
            saved = load_pickle(path)
            if isinstance(saved, dict) and saved.get("layers"):
                return saved["layers"]
        except UserError:
            pass
    for val_mb, weights in zip(record.get("val_mb_n_hist") or [], record.get("val_af_weights_hist") or []):
        if val_mb == mb and weights:
            return weights
    return None


def af_curves(records, weights, layers):
    """layer -> matrix runs x AF_X of the learned activation functions."""
    curves = {}
    for layer in layers:
        rows = []
        for record, layer_weights in zip(records, weights):
            entry = layer_weights.get(layer)
            if entry is None:
                continue
            settings = record.get("settings") or {}
            beta = entry.get("swish_beta")
            rows.append(net.activation_numpy(AF_X, settings.get("af_set"), entry["blend_weights_raw"],
                                             1.0 if beta is None else beta,
                                             settings.get("blend_mode", "unrestricted")))
        curves[layer] = np.array(rows)
    return curves


def plot_af_shapes(spec, curves, n_runs, path):
    return save_figure(af_shapes_figure(spec, curves, n_runs), path)


def af_shapes_figure(spec, curves, n_runs):
    """Per layer: the learned functions (mean, min..max band over runs) with the plain ReLU dashed."""
    fig, axes = new_figure(len(curves), width=4, height=3.4)
    for ax, (layer, matrix) in zip(axes, curves.items()):
        ax.fill_between(AF_X, matrix.min(0), matrix.max(0), alpha=0.3, label="min..max over runs")
        ax.plot(AF_X, matrix.mean(0), lw=1.5, label="mean")
        ax.plot(AF_X, np.maximum(AF_X, 0.0), "--", color="black", lw=1.0, label="ReLU")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set(title=layer, xlabel="x", ylabel="f(x)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{spec}: activation functions at the tested minibatch ({n_runs} runs)")
    return fig


def blend_series(records, layer, index, key):
    """Per run: (val minibatches, value of blend weight index / swish beta of layer)."""
    series = []
    for record in records:
        mbs, values = [], []
        mode = (record.get("settings") or {}).get("blend_mode", "unrestricted")
        for mb, weights in zip(record.get("val_mb_n_hist") or [], record.get("val_af_weights_hist") or []):
            entry = (weights or {}).get(layer)
            if entry is None:
                continue
            if key == "swish_beta":
                value = entry.get("swish_beta")
            elif entry.get("blend_weights") is not None:
                value = np.asarray(entry["blend_weights"])[index]
            else:
                value = net.effective_weights_numpy(entry["blend_weights_raw"], mode)[index]
            if value is not None:
                mbs.append(mb)
                values.append(float(value))
        series.append((mbs, values))
    return [s for s in series if s[0]]


def plot_blend_weights(spec, records, layers, af_set, path):
    """Effective blend weights per layer over training; Swish's beta (if any) on a right-hand axis."""
    names = net.parse_af_set(af_set)
    fig, axes = new_figure(len(layers), width=4.5, height=3.4)
    legend_axes = [axes[0]]
    for ax, layer in zip(axes, layers):
        for i, name in enumerate(names):
            draw_band(ax, blend_series(records, layer, i, "blend_weights"), net.BASE_FUNCTIONS[name].label)
        beta = blend_series(records, layer, 0, "swish_beta")
        if beta:
            twin = ax.twinx()
            draw_band(twin, beta, "β (Swish, right axis)", style="--", color="black")
            twin.set_ylabel("Swish β")
            if ax is axes[0]:
                legend_axes.append(twin)
        ax.set(title=layer, xlabel="minibatch", ylabel="effective blend weight")
        ax.grid(alpha=0.3)
    axes[0].legend(handles=[h for a in legend_axes for h in a.get_legend_handles_labels()[0]], fontsize=7)
    fig.suptitle(f"{spec}: blend weights over training (mean over {len(records)} runs, band min..max)")
    return save_figure(fig, path)


def draw_band(ax, series, label, style="-", color=None):
    if not series:
        return
    grid, matrix = on_common_grid(series)
    mean, low, high = band(matrix)
    line, = ax.plot(grid, mean, style, lw=1.2, label=label, color=color)
    if len(series) > 1:
        ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.15)


def preact_series(records, layer, key):
    series = []
    for record in records:
        pairs = [(mb, float(stats_[layer][key])) for mb, stats_ in
                 zip(record.get("val_mb_n_hist") or [], record.get("val_preact_stats_hist") or [])
                 if stats_ and layer in stats_]
        if pairs:
            series.append(([p[0] for p in pairs], [p[1] for p in pairs]))
    return series


def plot_preact_stats(spec, records, layers, path):
    fig, axes = new_figure(2, width=6, height=4, ncols=2)
    for ax, key in zip(axes, ("mean", "std")):
        for layer in layers:
            series = preact_series(records, layer, key)
            if series:
                grid, matrix = on_common_grid(series)
                ax.plot(grid, band(matrix)[0], lw=1.2, label=layer)
        ax.set(title=f"pre-activation {key}", xlabel="minibatch", ylabel=key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{spec}: pre-activation statistics on the validation set (mean over {len(records)} runs)")
    return save_figure(fig, path)


# ---------------------------------------------------------------- one spec

def history_layers(records, key):
    """Layers named in the history `key` of any record."""
    names = []
    for record in records:
        for entry in record.get(key) or []:
            names += [name for name in (entry or {}) if name not in names]
    return layer_order(records[0], names) if names else []


def spec_plots(exp_dir, spec, runs, records, analysis_dir, curve, out):
    """All per-spec plots: {kind: (path, None) or (None, why it was skipped)}; a skip is also sent to out."""
    png = lambda kind: os.path.join(analysis_dir, f"{kind}_{spec}.png")  # noqa: E731
    plots = {"performance_analysis": (plot_spec_performance(spec, curve, len(runs), png("performance_analysis")),
                                      None),
             "all_runs": (plot_all_runs(spec, runs, records, png("all_runs")), None),
             "af_shapes": af_shapes_plot(exp_dir, spec, runs, records, analysis_dir, out)}
    af_set = (records[0].get("settings") or {}).get("af_set")
    layers = history_layers(records, "val_af_weights_hist")
    if layers and af_set:
        plots["blend_weights"] = (plot_blend_weights(spec, records, layers, af_set, png("blend_weights")), None)
    else:
        plots["blend_weights"] = (None, "no run recorded val_af_weights_hist (and af_set)")
        out(f"skipped blend_weights_{spec}.png: {plots['blend_weights'][1]}")
    layers = history_layers(records, "val_preact_stats_hist")
    if layers:
        plots["preactivation_stats"] = (plot_preact_stats(spec, records, layers, png("preactivation_stats")), None)
    else:
        plots["preactivation_stats"] = (None, "no run recorded val_preact_stats_hist")
        out(f"skipped preactivation_stats_{spec}.png: {plots['preactivation_stats'][1]}")
    return plots


def af_shapes_plot(exp_dir, spec, runs, records, analysis_dir, out):
    """(path, None), or (None, why) when no run has AF weights of its tested model."""
    name = f"af_shapes_{spec}.png"
    found = [(run, record, tested_af_weights(exp_dir, spec, run, record)) for run, record in zip(runs, records)]
    missing = [str(run) for run, _, weights in found if weights is None]
    found = [(record, weights) for _, record, weights in found if weights is not None]
    if not found:
        why = "no run saved its AF weights at the tested minibatch"
        out(f"skipped {name}: {why}")
        return None, why
    if missing:
        out(f"{name}: runs {', '.join(missing)} saved no AF weights at the tested minibatch, left out")
    records_found, weights = [r for r, _ in found], [w for _, w in found]
    layers = layer_order(records_found[0], list(dict.fromkeys(name for w in weights for name in w)))
    curves = {layer: m for layer, m in af_curves(records_found, weights, layers).items() if len(m)}
    return plot_af_shapes(spec, curves, len(found), os.path.join(analysis_dir, name)), None


def spec_summary(spec, runs, records, metrics, curve, excluded, notes):
    """The original's performance dictionary plus the suite's keys (pickled per spec)."""
    summary = original_summary(spec, records)
    summary.update({"runs": list(runs), "early_stopping_mb": [m["early_stopping_mb"] for m in metrics],
                    "val_curve": {"mb": curve[0], "mean": curve[1], "min": curve[2], "max": curve[3]},
                    "excluded": excluded, "warnings": notes, "definitions": __doc__})
    for kind in ("train", "val", "test"):
        summary[f"{kind}_acc"] = [m[f"{kind}_acc"] for m in metrics]
        summary[f"{kind}_acc_stats"] = describe(summary[f"{kind}_acc"])
    return summary


# ---------------------------------------------------------------- the whole experiment

def check_experiment(exp_dir):
    if not os.path.isdir(exp_dir):
        raise UserError(f"experiment folder {exp_dir} does not exist")
    specs = [spec for spec in spec_folders(exp_dir) if run_numbers(exp_dir, spec)]
    if not specs:
        raise UserError(f"experiment folder {exp_dir} holds no runs (no <spec>/run_<n> folders)")
    return specs


def analyse_experiment(exp_dir, reference="relu", out=print):
    """Tables, significance tests, plots and report.html of every analysed run of the experiment in exp_dir.

    Writes into exp_dir/0_analysis/ and returns {'performance': rows, 'significance': rows or None,
    'excluded': rows, 'warnings': lines, 'analysis_dir': path, 'report': path}. Definitions: see the
    module docstring.
    """
    exp_dir = os.path.normpath(exp_dir)
    specs = check_experiment(exp_dir)
    analysis_dir = os.path.join(exp_dir, "0_analysis")
    experiment = os.path.basename(exp_dir)
    performance, excluded, notes, test_accs, curves, summaries, plots, settings = [], [], [], {}, {}, {}, {}, {}
    kernels, diverged = {}, []
    check_same_data(exp_dir, specs)
    for spec in specs:
        runs, records, spec_excluded, spec_notes = load_spec(exp_dir, spec, out)
        excluded += spec_excluded
        notes += spec_notes
        if not runs:
            continue
        metrics = [run_metrics(record) for record in records]
        grid, matrix = val_curves(records)
        curves[spec] = (grid, *band(matrix))
        plots[spec] = spec_plots(exp_dir, spec, runs, records, analysis_dir, curves[spec], out)
        summaries[spec] = spec_summary(spec, runs, records, metrics, curves[spec], spec_excluded, spec_notes)
        performance.append(performance_row(summaries[spec], metrics, records))
        test_accs[spec] = {run: m["test_acc"] for run, m in zip(runs, metrics)}
        diverged += [{"spec_name": spec, "run": run, "diverged_at_mb": record["diverged_at_mb"],
                      "early_stopping_mb": m["early_stopping_mb"]}
                     for run, record, m in zip(runs, records, metrics) if record.get("diverged")]
        settings[spec] = [record.get("settings") or {} for record in records]
        kernels[spec] = [(record.get("activation_kernel"), record.get("activation_kernel_build")) for record in records]
    write_csv(os.path.join(analysis_dir, "excluded_runs.csv"), EXCLUDED_COLUMNS, excluded)
    if not performance and not any(row["category"] == "bad_test_acc" for row in excluded):
        raise UserError(f"experiment folder {exp_dir} has no complete run ({len(excluded)} excluded, "
                        f"listed in {os.path.join(analysis_dir, 'excluded_runs.csv')})")
    if not performance:  # a finding, not an error: the report and excluded_runs.csv show every run and why
        out("every complete run was excluded as a bad run (test accuracy in (0, 0.3)): nothing to compare")
    write_csv(os.path.join(analysis_dir, "main_performance_analysis.csv"), performance_columns(), performance)
    experiment_plot = None
    if curves:
        experiment_plot = plot_all_specs(curves, os.path.join(analysis_dir, f"PA_{experiment}.png"), experiment)
    significance = significance_table(test_accs, reference, analysis_dir, out)
    for spec, summary in summaries.items():
        summary["significance"] = next((r for r in significance or [] if r["spec_name"] == spec), None)
        save_pickle(os.path.join(analysis_dir, f"performance_summary_{spec}.pkl"), summary)
    report = deepnet_report.write_report(
        os.path.join(analysis_dir, "report.html"), exp_dir=exp_dir, reference=reference, specs=specs,
        performance=performance, significance=significance, excluded=excluded, warnings=notes,
        experiment_plot=experiment_plot, spec_plots=plots, settings=settings, diverged=diverged,
        kernels=kernels)
    hparams = {spec: settings[spec][0] if spec in settings else first_settings(exp_dir, spec) for spec in specs}
    hparams = {spec: values for spec, values in hparams.items() if values}
    if hparams:
        write_hparams_config(exp_dir, hparams)
    out(summary_table(performance, significance, reference))
    out(f"tables, plots and summaries: {analysis_dir}")
    out(f"TensorBoard (curves, histograms, HParams): tensorboard --logdir {os.path.join(exp_dir, '0_summaries')}")
    out(f"report: {report}")
    return {"performance": performance, "significance": significance, "excluded": excluded, "warnings": notes,
            "diverged": diverged, "analysis_dir": analysis_dir, "report": report}


def significance_table(test_accs, reference, analysis_dir, out):
    """Write significance.csv (None, with one line, if the reference spec has no analysed run)."""
    if reference not in test_accs:
        out(f"reference spec '{reference}' has no analysed run in this experiment: "
            "significance.csv not written")
        return None
    rows = significance_rows(test_accs, reference)
    few = [spec for spec, values in test_accs.items() if len(values) < 2]
    if few:
        out(f"fewer than 2 analysed runs, so no tests (p values NaN) for: {', '.join(few)}")
    write_csv(os.path.join(analysis_dir, "significance.csv"), SIGNIFICANCE_COLUMNS, rows)
    return rows


def summary_table(performance, significance, reference):
    """The compact table printed at the end (accuracies in %, differences in percentage points)."""
    by_spec = {row["spec_name"]: row for row in significance or []}
    width = max([len("spec")] + [len(row["spec_name"]) for row in performance])
    lines = [f"{'spec':<{width}}  {'n':>3}  {'test acc [%]':>15}  {'Δ vs ' + reference + ' [pp]':>16}  "
             f"{'p paired t (Holm)':>17}  {'p Welch (Holm)':>14}"]
    for row in performance:
        spec = row["spec_name"]
        acc = f"{100 * row['test acc [mean]']:.2f} ± {100 * row['test acc [std]']:.2f}"
        if spec == reference:
            delta, paired, p = "(reference)", "", ""
        elif spec in by_spec:
            delta = f"{100 * by_spec[spec]['mean_diff']:+.2f}"
            paired = deepnet_report.format_p(by_spec[spec]["paired_t_p_holm"])
            p = deepnet_report.format_p(by_spec[spec]["welch_p_holm"])
        else:
            delta, paired, p = "", "", ""
        lines.append(f"{spec:<{width}}  {row['n_runs']:>3}  {acc:>15}  {delta:>16}  {paired:>17}  {p:>14}")
    return "\n".join(lines)

