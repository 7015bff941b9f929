"""Analysis of one experiment: performance tables, significance tests, plots.

Reads only the recorders EXP/<spec>/run_<run>/record_<spec>_run_<run>.pkl (and, for the activation
shapes, the AF-weight files in EXP/0_af_weights/) and writes everything into EXP/0_analysis/.

A run is analysed when its recorder reads, test_completed is True and diverged is False; every other
run is named in the output and in 0_analysis/excluded_runs.csv with the reason. Per analysed run:

    test acc   test_top1 of the tested model (the model at early_stopping_mb)
    val acc    val_top1 (raw, not smoothed) at early_stopping_mb; if early_stopping_mb is not a
               validation minibatch, the last validation before it
    train acc  mean of train_top1 over the last val_every training minibatches up to and including
               early_stopping_mb, i.e. minibatches es-val_every+1 .. es (val_every from the settings,
               else the spacing of val_mb_n_hist); NaN when early_stopping_mb is 0

Across the runs of a spec (main_performance_analysis.csv): median, mean, var, std, max, min; var and
std are sample statistics (ddof=1), so with a single run they are NaN, written 'nan' like every
NaN in these CSV files. Accuracies are fractions in [0, 1].

Significance (significance.csv), each spec's test acc against the reference spec's:
    welch_p          two-sided Welch t-test (scipy.stats.ttest_ind, equal_var=False)
    mannwhitney_p    two-sided Mann-Whitney U test (scipy.stats.mannwhitneyu, method 'auto')
    *_holm           Holm-Bonferroni step-down adjustment over all specs with a p value
    hedges_g         J * (mean_spec - mean_ref) / s_pooled, s_pooled^2 = ((n1-1) s1^2 + (n2-1) s2^2)
                     / (n1 + n2 - 2) with sample variances, J = 1 - 3 / (4 (n1 + n2) - 9)
A spec (or a reference) with fewer than 2 runs gets NaN p values and NaN g; NaN p values do not
count towards the Holm correction.
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
from deepnet_util import UserError, atomic_write_bytes, load_pickle, save_pickle, save_text  # noqa: E402

ACC_KINDS = ("train", "val", "test")
STAT_NAMES = ("median", "mean", "var", "std", "max", "min")
SIGNIFICANCE_COLUMNS = ("spec_name", "reference", "n", "n_reference", "mean_diff", "welch_p",
                        "mannwhitney_p", "welch_p_holm", "mannwhitney_p_holm", "hedges_g")
EXCLUDED_COLUMNS = ("spec_name", "run", "reason", "recorder")
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


def load_run(exp_dir, spec, run):
    """(recorder, None) for an analysable run, else (None, reason)."""
    path = recorder_path(exp_dir, spec, run)
    if not os.path.exists(path):
        return None, "no recorder file"
    try:
        record = load_pickle(path)
    except UserError as err:
        return None, f"unreadable recorder ({err})"
    if not isinstance(record, dict):
        return None, "unreadable recorder (not a dict)"
    if record.get("diverged"):
        return None, f"diverged at minibatch {record.get('diverged_at_mb')}"
    if not record.get("test_completed"):
        trained = record.get("mb_count_total")
        total = (record.get("settings") or {}).get("n_minibatches")
        return None, f"incomplete: test not done (trained {trained} of {total} minibatches)"
    if tested_mb(record) is None or record.get("test_top1") is None:
        return None, "recorder has no early_stopping_mb or test_top1"
    return record, None


def tested_mb(record):
    """The minibatch of the tested model: early_stopping_mb, else the last test_mb_n_hist entry."""
    if record.get("early_stopping_mb") is not None:
        return int(record["early_stopping_mb"])
    history = record.get("test_mb_n_hist") or []
    return int(history[-1]) if history else None


# ---------------------------------------------------------------- per-run numbers

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
    for i, val_mb in enumerate(record.get("val_mb_n_hist") or []):
        if val_mb <= mb and i < len(record.get("val_top1_hist") or []):
            best = i
    return float(record["val_top1_hist"][best]) if best is not None else math.nan


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
    """median, mean, var, std, max, min of values (var/std with ddof=1; NaN for one value)."""
    a = np.asarray(values, dtype=np.float64)
    spread = len(a) > 1
    return {"median": float(np.median(a)), "mean": float(np.mean(a)),
            "var": float(np.var(a, ddof=1)) if spread else math.nan,
            "std": float(np.std(a, ddof=1)) if spread else math.nan,
            "max": float(np.max(a)), "min": float(np.min(a))}


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


def compare(a, b):
    """Welch and Mann-Whitney two-sided p values and Hedges' g of a against b (NaN for n < 2)."""
    welch_p = mannwhitney_p = math.nan
    if len(a) >= 2 and len(b) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            welch_p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
        mannwhitney_p = float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)
    return {"mean_diff": float(np.mean(a) - np.mean(b)), "welch_p": welch_p,
            "mannwhitney_p": mannwhitney_p, "hedges_g": hedges_g(a, b)}


def significance_rows(test_accs, reference):
    """One row per spec other than the reference, Holm-adjusted over those rows."""
    ref = test_accs[reference]
    rows = []
    for spec, values in test_accs.items():
        if spec != reference:
            rows.append({"spec_name": spec, "reference": reference, "n": len(values),
                         "n_reference": len(ref), **compare(values, ref)})
    for key in ("welch_p", "mannwhitney_p"):
        for row, adjusted in zip(rows, holm([row[key] for row in rows])):
            row[f"{key}_holm"] = float(adjusted)
    return rows


# ---------------------------------------------------------------- tables

def format_value(value):
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
    columns = ["spec_name", "n_runs", "es mb [mean]", "es mb [std]"]
    for kind in ACC_KINDS:
        columns += [f"{kind} acc [{name}]" for name in STAT_NAMES]
    return columns


def performance_row(spec, metrics):
    es = np.asarray([m["early_stopping_mb"] for m in metrics], np.float64)
    row = {"spec_name": spec, "n_runs": len(metrics), "es mb [mean]": float(np.mean(es)),
           "es mb [std]": float(np.std(es, ddof=1)) if len(es) > 1 else math.nan}
    for kind in ACC_KINDS:
        for name, value in describe([m[f"{kind}_acc"] for m in metrics]).items():
            row[f"{kind} acc [{name}]"] = value
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
    return on_common_grid([(r.get("val_mb_n_hist") or [], r.get("val_top1_hist") or []) for r in records])


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
        ax.plot(record.get("val_mb_n_hist") or [], record.get("val_top1_hist") or [], lw=0.8,
                label=f"run {run}")
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
    """layer -> AF weights of the tested model: its AF-weights file, else the recorder's history."""
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
    fig, axes = new_figure(len(curves), width=4, height=3.4)
    for ax, (layer, matrix) in zip(axes, curves.items()):
        ax.fill_between(AF_X, matrix.min(0), matrix.max(0), alpha=0.3, label="min..max over runs")
        ax.plot(AF_X, matrix.mean(0), lw=1.5, label="mean")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set(title=layer, xlabel="x", ylabel="f(x)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{spec}: activation functions at the tested minibatch ({n_runs} runs)")
    return save_figure(fig, path)


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

def load_spec(exp_dir, spec, out):
    """(runs, records, excluded rows) of a spec; excluded runs are reported through out."""
    runs, records, excluded = [], [], []
    for run in run_numbers(exp_dir, spec):
        record, reason = load_run(exp_dir, spec, run)
        if record is None:
            out(f"excluded: {spec} run {run}: {reason}")
            excluded.append({"spec_name": spec, "run": run, "reason": reason,
                             "recorder": recorder_path(exp_dir, spec, run)})
        else:
            runs.append(run)
            records.append(record)
    return runs, records, excluded


def history_layers(records, key):
    """Layers named in the history `key` of any record."""
    names = []
    for record in records:
        for entry in record.get(key) or []:
            names += [name for name in (entry or {}) if name not in names]
    return layer_order(records[0], names) if names else []


def spec_plots(exp_dir, spec, runs, records, analysis_dir, curve, out):
    """All per-spec plots; a plot whose inputs no run saved is skipped with one line."""
    png = lambda kind: os.path.join(analysis_dir, f"{kind}_{spec}.png")  # noqa: E731
    plot_spec_performance(spec, curve, len(runs), png("performance_analysis"))
    plot_all_runs(spec, runs, records, png("all_runs"))
    af_shapes_plot(exp_dir, spec, runs, records, analysis_dir, out)
    af_set = (records[0].get("settings") or {}).get("af_set")
    layers = history_layers(records, "val_af_weights_hist")
    if layers and af_set:
        plot_blend_weights(spec, records, layers, af_set, png("blend_weights"))
    else:
        out(f"skipped blend_weights_{spec}.png: no run recorded val_af_weights_hist (and af_set)")
    layers = history_layers(records, "val_preact_stats_hist")
    if layers:
        plot_preact_stats(spec, records, layers, png("preactivation_stats"))
    else:
        out(f"skipped preactivation_stats_{spec}.png: no run recorded val_preact_stats_hist")


def af_shapes_plot(exp_dir, spec, runs, records, analysis_dir, out):
    name = f"af_shapes_{spec}.png"
    found = [(run, record, tested_af_weights(exp_dir, spec, run, record)) for run, record in zip(runs, records)]
    missing = [str(run) for run, _, weights in found if weights is None]
    found = [(record, weights) for _, record, weights in found if weights is not None]
    if not found:
        out(f"skipped {name}: no run saved its AF weights at the tested minibatch")
        return None
    if missing:
        out(f"{name}: runs {', '.join(missing)} saved no AF weights at the tested minibatch, left out")
    records_found, weights = [r for r, _ in found], [w for _, w in found]
    layers = layer_order(records_found[0], list(dict.fromkeys(name for w in weights for name in w)))
    curves = {layer: m for layer, m in af_curves(records_found, weights, layers).items() if len(m)}
    return plot_af_shapes(spec, curves, len(found), os.path.join(analysis_dir, name))


def spec_summary(spec, runs, metrics, curve):
    """The numbers behind the tables for one spec (plain dict, pickled)."""
    summary = {"spec_name": spec, "runs": list(runs),
               "early_stopping_mb": [m["early_stopping_mb"] for m in metrics],
               "val_curve": {"mb": curve[0], "mean": curve[1], "min": curve[2], "max": curve[3]},
               "definitions": __doc__}
    for kind in ACC_KINDS:
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
    """Tables, significance tests and plots of every complete run of the experiment in exp_dir.

    Writes into exp_dir/0_analysis/ and returns {'performance': rows, 'significance': rows or None,
    'excluded': rows, 'analysis_dir': path}. Definitions: see the module docstring.
    """
    exp_dir = os.path.normpath(exp_dir)
    specs = check_experiment(exp_dir)
    analysis_dir = os.path.join(exp_dir, "0_analysis")
    experiment = os.path.basename(exp_dir)
    performance, excluded, test_accs, curves, summaries = [], [], {}, {}, {}
    for spec in specs:
        runs, records, spec_excluded = load_spec(exp_dir, spec, out)
        excluded += spec_excluded
        if not runs:
            continue
        metrics = [run_metrics(record) for record in records]
        grid, matrix = val_curves(records)
        curves[spec] = (grid, *band(matrix))
        spec_plots(exp_dir, spec, runs, records, analysis_dir, curves[spec], out)
        performance.append(performance_row(spec, metrics))
        test_accs[spec] = [m["test_acc"] for m in metrics]
        summaries[spec] = spec_summary(spec, runs, metrics, curves[spec])
    if not performance:
        write_csv(os.path.join(analysis_dir, "excluded_runs.csv"), EXCLUDED_COLUMNS, excluded)
        raise UserError(f"experiment folder {exp_dir} has no complete run ({len(excluded)} excluded, "
                        f"listed in {os.path.join(analysis_dir, 'excluded_runs.csv')})")
    write_csv(os.path.join(analysis_dir, "main_performance_analysis.csv"), performance_columns(), performance)
    write_csv(os.path.join(analysis_dir, "excluded_runs.csv"), EXCLUDED_COLUMNS, excluded)
    plot_all_specs(curves, os.path.join(analysis_dir, f"PA_{experiment}.png"), experiment)
    significance = significance_table(test_accs, reference, analysis_dir, out)
    for spec, summary in summaries.items():
        summary["significance"] = next((r for r in significance or [] if r["spec_name"] == spec), None)
        save_pickle(os.path.join(analysis_dir, f"performance_summary_{spec}.pkl"), summary)
    out(summary_table(performance, significance, reference))
    out(f"tables, plots and summaries: {analysis_dir}")
    return {"performance": performance, "significance": significance, "excluded": excluded,
            "analysis_dir": analysis_dir}


def significance_table(test_accs, reference, analysis_dir, out):
    """Write significance.csv (None, with one line, if the reference spec has no complete run)."""
    if reference not in test_accs:
        out(f"reference spec '{reference}' has no complete run in this experiment: "
            "significance.csv not written")
        return None
    rows = significance_rows(test_accs, reference)
    few = [spec for spec, values in test_accs.items() if len(values) < 2]
    if few:
        out(f"fewer than 2 complete runs, so no tests (p values NaN) for: {', '.join(few)}")
    write_csv(os.path.join(analysis_dir, "significance.csv"), SIGNIFICANCE_COLUMNS, rows)
    return rows


def summary_table(performance, significance, reference):
    """The compact table printed at the end (accuracies in %, differences in percentage points)."""
    by_spec = {row["spec_name"]: row for row in significance or []}
    width = max(len("spec"), *(len(row["spec_name"]) for row in performance))
    lines = [f"{'spec':<{width}}  {'n':>3}  {'test acc [%]':>15}  {'Δ vs ' + reference + ' [pp]':>16}  "
             f"{'p Welch (Holm)':>14}"]
    for row in performance:
        spec = row["spec_name"]
        std = row["test acc [std]"]
        acc = f"{100 * row['test acc [mean]']:.2f} ± {100 * std:.2f}" if not math.isnan(std) \
            else f"{100 * row['test acc [mean]']:.2f}"
        if spec == reference:
            delta, p = "(reference)", ""
        elif spec in by_spec:
            delta = f"{100 * by_spec[spec]['mean_diff']:+.2f}"
            p = format_p(by_spec[spec]["welch_p_holm"])
        else:
            delta, p = "", ""
        lines.append(f"{spec:<{width}}  {row['n_runs']:>3}  {acc:>15}  {delta:>16}  {p:>14}")
    return "\n".join(lines)


def format_p(p):
    if math.isnan(p):
        return "nan"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"
