"""The analysis plots: validation curves of the experiment, per spec every run, the learned activation functions
per layer, blend weights and pre-activation statistics over training. No TensorFlow.
"""
import io
import math
import os

import matplotlib
matplotlib.use("Agg")
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402
import numpy as np  # noqa: E402

from deepnet import activations, architectures, run_folder  # noqa: E402
from deepnet.results import tested_mb, validation_history  # noqa: E402
from deepnet.run_statistics import band, on_common_grid  # noqa: E402
from deepnet_util import UserError, atomic_write_bytes, load_pickle  # noqa: E402

AF_X = np.linspace(-3.0, 3.0, 241)


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
    """Write fig to path as a PNG, atomically. Every text is drawn as written, never as math text: titles, legends
    and panel names hold spec and layer names read from disk, in which a '$' must not break the plot."""
    for text in fig.findobj(Text):
        text.set_parse_math(False)
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
    if network in architectures.ARCHITECTURES:
        known = [name for name in architectures.activated_layers(network) if name in names]
        return known + [name for name in names if name not in known]
    return list(names)


def tested_af_weights(exp_dir, spec, run, record):
    """layer -> AF weights of the tested model: recorder['test_af_weights'], else (old recorders) the
    suite's old AF-weights file of the tested minibatch, else the recorder's history at that minibatch."""
    if record.get("test_af_weights"):
        return record["test_af_weights"]
    mb = tested_mb(record)
    path = run_folder.af_weights_path(exp_dir, spec, run, mb)
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
            rows.append(activations.activation_numpy(AF_X, settings.get("af_set"), entry["blend_weights_raw"],
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
                value = activations.effective_weights_numpy(entry["blend_weights_raw"], mode)[index]
            if value is not None:
                mbs.append(mb)
                values.append(float(value))
        series.append((mbs, values))
    return [s for s in series if s[0]]


def plot_blend_weights(spec, records, layers, af_set, path):
    """Effective blend weights per layer over training; Swish's beta (if any) on a right-hand axis."""
    names = activations.parse_af_set(af_set)
    fig, axes = new_figure(len(layers), width=4.5, height=3.4)
    legend_axes = [axes[0]]
    for ax, layer in zip(axes, layers):
        for i, name in enumerate(names):
            draw_band(ax, blend_series(records, layer, i, "blend_weights"), activations.BASE_FUNCTIONS[name].label)
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
