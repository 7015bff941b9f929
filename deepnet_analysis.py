"""Analysis of one experiment: the original's performance tables, significance tests, plots, one-page report.

Reads only the recorders EXP/<spec>/run_<run>/record_<spec>_run_<run>.pkl (for the activation shapes of old
recorders also the AF-weight files in EXP/0_af_weights/) and writes everything into EXP/0_analysis/; the last
line printed is the path of 0_analysis/report.html, the page to open. The set is written as one: into a new
folder EXP/0_analysis.tmp_<random>/ that replaces 0_analysis/ in one step at the end (Linux renameat2
RENAME_EXCHANGE; where the file system cannot, e.g. NFS, two renames, said in one line), so a failure or a full
disk leaves the previous set as it was; EXP/0_analysis.lock lets one analysis of an experiment write at a time
(another waits) and the next one delete what a killed one left. Then the HParams config in EXP/0_summaries/.
Spec folders whose names break the suite's rule (deepnet/names.py) are skipped with one line; an experiment
folder whose name breaks it, or a -reference that names no spec folder, is a UserError (nothing written).

Which runs are analysed. A run is left out, and listed with the reason in 0_analysis/excluded_runs.csv
(columns spec_name; run; category; reason; recorder), when
    running                    another live process holds its lock (it trains, or tests, the run now)
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
An experiment without any complete run is a UserError (nothing written; the printed lines name every run left out
and why); one whose complete runs are all bad is analysed (empty
table, every run listed with its reason in excluded_runs.csv and the report). An experiment whose complete runs
of one task and preprocessing were trained on different data (their recorded data fingerprints differ), or whose
runs with one seed and split settings on different splits, is a UserError too: such runs are not comparable.

Every .csv file is ';'-separated and written by the csv module: a cell holding ';', '"' or a line break is quoted,
and a text cell starting with =, +, -, @, tab or carriage return gets a leading ' so that a spreadsheet shows it
as text (numbers are written as they are).

main_performance_analysis.csv, one row per spec with an analysed run; the original's columns first:
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
import csv
import errno
import glob
import io
import math
import os
import secrets
import shutil
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from deepnet import figures, outputs, report, run_folder
from deepnet.results import (check_experiment, check_same_data, first_settings, has_validation_set, load_spec,
                             run_metrics, tested_mb, validation_history)
from deepnet.run_statistics import (band, describe, list_statistics, on_common_grid, over_runs, significance_rows,
                                    without_repeated_validations)
from deepnet_util import (RunLock, UserError, fsync_folder, remove_path, replace_folder, save_pickle,
                          save_text)

STAT_NAMES = ("median", "mean", "var", "std", "max", "min")
AT_ES_KINDS = ("train", "val")
SIGNIFICANCE_COLUMNS = ("spec_name", "reference", "n", "n_reference", "mean_diff", "mean_diff_ci_low",
                        "mean_diff_ci_high", "welch_p", "mannwhitney_p", "welch_p_holm", "mannwhitney_p_holm",
                        "hedges_g", "n_pairs", "paired_t_p", "wilcoxon_p", "paired_t_p_holm", "wilcoxon_p_holm")
EXCLUDED_COLUMNS = ("spec_name", "run", "category", "reason", "recorder")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")   # a spreadsheet takes a text cell starting so for a formula
STAGING = ".tmp_"          # 0_analysis.tmp_<random>: the next set while it is written; its predecessor after the swap
ANALYSIS_LOCK = "0_analysis.lock"   # held while the analysis writes its set (and the HParams config)


# ---------------------------------------------------------------- a spec's numbers

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


def csv_cell(value):
    """A table cell: numbers as format_value writes them; text that a spreadsheet would take for a formula (starting
    with one of FORMULA_STARTS) behind a ' that keeps it text."""
    text = format_value(value)
    return "'" + text if isinstance(value, str) and text.startswith(FORMULA_STARTS) else text


def write_csv(path, columns, rows):
    """A ';'-separated table with a header line, quoted by the csv module where a cell holds ';', '"' or a line
    break; NaN is written as 'nan'."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=";", lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([csv_cell(row[column]) for column in columns] for row in rows)
    save_text(path, buffer.getvalue())


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


def val_curves(records):
    """(grid, (mean, min, max)) of the validation accuracy over runs, on the union of their minibatches."""
    grid, matrix = on_common_grid([validation_history(r)[:2] for r in records])
    return (grid, *band(matrix))


# ---------------------------------------------------------------- one spec

@dataclass
class SpecAnalysis:
    """One spec's analysed runs (their recorders and numbers at the tested minibatch), the runs left out, the
    warnings, and once analysed: its validation curve, plots, summary dictionary and table row."""
    spec: str
    runs: list
    records: list
    excluded: list
    warnings: list
    metrics: list = field(default_factory=list)
    curve: tuple = None
    plots: dict = None
    summary: dict = None
    row: dict = None

    @property
    def settings(self):
        return [record.get("settings") or {} for record in self.records]

    @property
    def test_accs(self):
        return {run: m["test_acc"] for run, m in zip(self.runs, self.metrics)}

    @property
    def diverged(self):
        """The analysed runs that diverged: spec, run, where it diverged and the tested minibatch."""
        return [{"spec_name": self.spec, "run": run, "diverged_at_mb": record["diverged_at_mb"],
                 "early_stopping_mb": m["early_stopping_mb"]}
                for run, record, m in zip(self.runs, self.records, self.metrics) if record.get("diverged")]

    @property
    def kernels(self):
        """(activation kernel, its build) of each analysed run."""
        return [(record.get("activation_kernel"), record.get("activation_kernel_build")) for record in self.records]


def analyse_spec(exp_dir, result, analysis_dir, out):
    """Compute the numbers of a spec with analysed runs and draw its plots into analysis_dir."""
    result.metrics = [run_metrics(record) for record in result.records]
    result.curve = val_curves(result.records)
    result.plots = figures.spec_plots(exp_dir, result.spec, result.runs, result.records, analysis_dir, result.curve,
                                      out)
    result.summary = spec_summary(result.spec, result.runs, result.records, result.metrics, result.curve,
                                  result.excluded, result.warnings)
    result.row = performance_row(result.summary, result.metrics, result.records)


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

@dataclass
class ExperimentAnalysis:
    """What report.html shows: every spec's analysis, the reference, the significance rows, the experiment plot."""
    exp_dir: str
    reference: str
    specs: dict
    significance: list = None
    experiment_plot: str = None

    @property
    def analysed(self):
        return [result for result in self.specs.values() if result.runs]

    @property
    def performance(self):
        return [result.row for result in self.analysed]

    @property
    def excluded(self):
        return [row for result in self.specs.values() for row in result.excluded]

    @property
    def warnings(self):
        return [line for result in self.specs.values() for line in result.warnings]

    @property
    def diverged(self):
        return [row for result in self.analysed for row in result.diverged]


def analyse_experiment(exp_dir, reference="relu", out=print, reference_required=True):
    """Tables, significance tests, plots and report.html of every analysed run of the experiment in exp_dir.

    Writes the set into a new folder beside exp_dir/0_analysis/ and swaps it in at the end, so a failure leaves the
    previous set as it was; bad input (no such experiment or reference, runs on different data, no complete run)
    writes nothing. Without reference_required (a sweep whose reference spec was not selected) a reference with no
    spec folder only leaves the comparisons out, in one line. Returns {'performance': rows, 'significance': rows or
    None, 'excluded': rows, 'warnings': lines, 'analysis_dir': path, 'report': path}. Definitions: see the module
    docstring.
    """
    exp_dir = os.path.normpath(exp_dir)
    specs = check_experiment(exp_dir, reference, out, reference_required)
    check_same_data(exp_dir, specs)
    analysis = ExperimentAnalysis(exp_dir, reference, {spec: SpecAnalysis(spec, *load_spec(exp_dir, spec, out))
                                                       for spec in specs})
    check_complete_runs(exp_dir, analysis)
    analysis_dir = run_folder.analysis_dir(exp_dir)
    lock = RunLock(os.path.join(exp_dir, ANALYSIS_LOCK))
    lock.acquire(waiting=lambda holder: out(f"waiting for the analysis of {exp_dir} by {holder} to end"))
    try:
        for leftover in glob.glob(glob.escape(analysis_dir + STAGING) + "*"):  # of an analysis that was killed
            remove_path(leftover)
        publish(analysis_dir, lambda folder: write_analysis(analysis, folder, out), out)
        write_hparams(analysis, out)
    finally:
        lock.release()
    performance, page = analysis.performance, os.path.join(analysis_dir, "report.html")
    out(summary_table(performance, analysis.significance, reference))
    out(f"tables, plots and summaries: {analysis_dir}")
    out(f"TensorBoard (curves, histograms, HParams): tensorboard --logdir {run_folder.summaries_dir(exp_dir)}")
    out(f"report: {page}")
    return {"performance": performance, "significance": analysis.significance, "excluded": analysis.excluded,
            "warnings": analysis.warnings, "diverged": analysis.diverged, "analysis_dir": analysis_dir,
            "report": page}


def check_complete_runs(exp_dir, analysis):
    """UserError when no run can be analysed and none was excluded as a bad run (nothing is written then)."""
    excluded = analysis.excluded
    if analysis.analysed or any(row["category"] == "bad_test_acc" for row in excluded):
        return
    counts = ", ".join(f"{n} {category}" for category, n in Counter(row["category"] for row in excluded).items())
    raise UserError(f"experiment folder {exp_dir} has no complete run ({len(excluded)} excluded: {counts}; the "
                    "lines above say why); nothing written")


def publish(final, write, out):
    """Call write(folder) on a new folder beside final, then swap it in for final in one step and delete the
    previous set. A failure (a full disk, an interruption) deletes the new folder and leaves final as it was."""
    staging = final + STAGING + secrets.token_hex(4)
    os.mkdir(staging)   # with the umask's permissions and a setgid parent's group
    try:
        write(staging)
        fsync_folder(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    was_link = os.path.islink(final)
    old, note = replace_folder(staging, final)
    if note:
        out(note)
    if was_link:
        out(f"note: {final} was a symbolic link: replaced by the analysis folder (what it pointed to is untouched)")
    if old:
        remove_path(old)
    fsync_folder(os.path.dirname(final))


def write_analysis(analysis, folder, out):
    """Every spec's numbers and plots, the tables, the summary pickles and report.html, into folder."""
    for result in analysis.analysed:
        analyse_spec(analysis.exp_dir, result, folder, out)
    performance, excluded = analysis.performance, analysis.excluded
    write_csv(os.path.join(folder, "excluded_runs.csv"), EXCLUDED_COLUMNS, excluded)
    if not performance:  # a finding, not an error: the report and excluded_runs.csv show every run and why
        out("every complete run was excluded as a bad run (test accuracy in (0, 0.3)): nothing to compare")
    write_csv(os.path.join(folder, "main_performance_analysis.csv"), performance_columns(), performance)
    if performance:
        curves = {result.spec: result.curve for result in analysis.analysed}
        experiment = os.path.basename(os.path.abspath(analysis.exp_dir))
        analysis.experiment_plot = figures.plot_all_specs(curves, os.path.join(folder, f"PA_{experiment}.png"),
                                                          experiment)
    test_accs = {result.spec: result.test_accs for result in analysis.analysed}
    analysis.significance = significance_table(test_accs, analysis.reference, folder, out)
    for result in analysis.analysed:
        result.summary["significance"] = next((row for row in analysis.significance or []
                                               if row["spec_name"] == result.spec), None)
        save_pickle(os.path.join(folder, f"performance_summary_{result.spec}.pkl"), result.summary)
    report.write_report(os.path.join(folder, "report.html"), analysis)


def write_hparams(analysis, out):
    """The experiment's HParams config in 0_summaries/, written once the set is in place (it is no part of it); one
    line instead when 0_summaries is a symbolic link or a file."""
    exp_dir = analysis.exp_dir
    hparams = {spec: result.settings[0] if result.runs else first_settings(exp_dir, spec)
               for spec, result in analysis.specs.items()}
    hparams = {spec: values for spec, values in hparams.items() if values}
    if not hparams:
        return
    try:
        outputs.write_hparams_config(exp_dir, hparams)
    except OSError as err:
        if err.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        out(f"HParams config not written: {err.filename}: {err.strerror}")


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
            paired = report.format_p(by_spec[spec]["paired_t_p_holm"])
            p = report.format_p(by_spec[spec]["welch_p_holm"])
        else:
            delta, paired, p = "", "", ""
        lines.append(f"{spec:<{width}}  {row['n_runs']:>3}  {acc:>15}  {delta:>16}  {paired:>17}  {p:>14}")
    return "\n".join(lines)
