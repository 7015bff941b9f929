"""The one-page report of an analysed experiment: EXP/0_analysis/report.html (deepnet_analysis.analyse_experiment).

One self-contained file: the plots are embedded as base64 PNG data URIs and the style sheet is inline, so it opens
in any browser without a network. Top: the comparison table; then the experiment's validation curves and the
plots of every spec; bottom: what produced it (settings, data variant with its sidecar checksums, suite commit,
library versions, date).

Rounding in the table: accuracies in % with 2 decimals, differences and their interval in percentage points with
2 decimals and a sign, p values with 3 decimals (2 significant digits below 0.001), Hedges' g with 2 decimals;
'—' where there is no value.
"""
import base64
import datetime
import html
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess

import numpy as np

from deepnet import datasets
from deepnet_util import MAX_JSON_DEPTH, load_json_object, save_text

GIT_TIMEOUT_S = 5
MISSING = "—"
SPEC_PLOTS = (
    ("all_runs", "Validation accuracy of every run"),
    ("af_shapes", "Learned activation functions per layer at the tested minibatch (mean, min..max over runs; "
                  "plain ReLU dashed)"),
    ("blend_weights", "Effective blend weights over training"),
    ("preactivation_stats", "Pre-activation mean and std over training"),
)
COLUMNS = ("spec", "runs analysed", "excluded", "diverged", "test acc [%] mean ± std", "test acc [%] median",
           "Δ to reference [pp]", "95 % CI of Δ [pp]", "pairs", "paired t p", "paired t p (Holm)", "Wilcoxon p",
           "Wilcoxon p (Holm)", "Welch p", "Welch p (Holm)", "Mann–Whitney p", "Mann–Whitney p (Holm)", "Hedges' g")
LEAD = ("The paired tests lead: run k of every spec shares its seed, so its validation split, the order of its "
        "minibatches, its dropout masks and its initial weights are the same, and the paired t-test and the "
        "Wilcoxon signed-rank test compare each run with the reference's run of the same number, which removes "
        "the run-to-run variation that pairs share. The unpaired Welch and Mann–Whitney tests, which ignore the "
        "pairing, follow for comparison.")
STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; padding: 0 1em; max-width: 1250px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; } h3 { margin-top: 1.4em; }
table { border-collapse: collapse; font-size: 13px; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; vertical-align: top; }
th { background: #eef; } td.number { text-align: right; white-space: nowrap; }
tr.reference td { background: #fff4c2; font-weight: bold; }
#comparison { display: block; max-width: 100%; overflow-x: auto; font-size: 12px; }
#comparison th, #comparison td { padding: 3px 5px; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.3em 0; }
.note { color: #555; font-size: 13px; } .missing { color: #a00; } code { font-size: 12px; }
"""


# ---------------------------------------------------------------- numbers as the table shows them

def is_missing(value):
    return value is None or (isinstance(value, float) and math.isnan(value))


def percent(value):
    return MISSING if is_missing(value) else f"{100 * value:.2f}"


def points(value):
    return MISSING if is_missing(value) else f"{100 * value:+.2f}"


def format_p(p):
    if is_missing(p):
        return "nan"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def p_cell(p):
    return MISSING if is_missing(p) else format_p(p)


def g_cell(g):
    return MISSING if is_missing(g) else f"{g:+.2f}"


# ---------------------------------------------------------------- html pieces

def esc(text):
    return html.escape(str(text), quote=True)


def element(name, content="", **attributes):
    """<name attributes>content</name>; content is already HTML, attribute values are escaped."""
    attrs = "".join(f' {key.rstrip("_")}="{esc(value)}"' for key, value in attributes.items())
    return f"<{name}{attrs}>{content}</{name}>"


def table(header, rows, row_classes=None, **attributes):
    """A table from a header (plain texts) and rows of cells: plain text or (plain text, css class)."""
    head = element("tr", "".join(element("th", esc(text)) for text in header))
    body = []
    for row, css_row in zip(rows, row_classes or [""] * len(rows)):
        cells = "".join(element("td", esc(text), class_=css) if css else element("td", esc(text))
                        for text, css in (cell if isinstance(cell, tuple) else (cell, "") for cell in row))
        body.append(element("tr", cells, class_=css_row) if css_row else element("tr", cells))
    return element("table", element("thead", head) + element("tbody", "".join(body)), **attributes)


def image(path, alt):
    """An <img> with the PNG file embedded as a data URI."""
    with open(path, "rb") as handle:
        data = base64.b64encode(handle.read()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def anchor(spec):
    return "spec-" + re.sub(r"[^A-Za-z0-9_-]", "_", spec)


# ---------------------------------------------------------------- the comparison table

def comparison_rows(analysis):
    """Per spec: counts and its CSV rows; analysed specs sorted by mean test acc (best first), then the others.
    Diverged: the analysed runs that diverged, counted with the untested diverged runs (which are excluded)."""
    by_sig = {row["spec_name"]: row for row in analysis.significance or []}
    rows = []
    for spec, result in analysis.specs.items():
        rows.append({"spec": spec, "perf": result.row, "sig": by_sig.get(spec), "analysed": len(result.runs),
                     "excluded": sum(row["category"] != "diverged" for row in result.excluded),
                     "diverged": sum(row["category"] == "diverged" for row in result.excluded)
                     + len(result.diverged if result.runs else []),
                     "reference": spec == analysis.reference})
    analysed = sorted((r for r in rows if r["perf"]), key=lambda r: (-r["perf"]["test acc [mean]"], r["spec"]))
    return analysed + [r for r in rows if not r["perf"]]


def comparison_cells(row):
    perf, sig = row["perf"] or {}, row["sig"] or {}
    number = lambda text: (text, "number")  # noqa: E731
    if perf:
        acc = f"{percent(perf['test acc [mean]'])} ± {percent(perf['test acc [std]'])}"
        median = percent(perf["test acc [median]"])
    else:
        acc = median = MISSING
    if row["reference"]:
        delta, interval = "reference", ""
    elif sig:
        delta = points(sig["mean_diff"])
        low, high = sig["mean_diff_ci_low"], sig["mean_diff_ci_high"]
        interval = MISSING if is_missing(low) else f"[{points(low)}, {points(high)}]"
    else:
        delta = interval = MISSING
    pairs = str(sig["n_pairs"]) if "n_pairs" in sig else MISSING
    return [row["spec"], number(str(row["analysed"])), number(str(row["excluded"])), number(str(row["diverged"])),
            number(acc), number(median), number(delta), number(interval), number(pairs),
            number(p_cell(sig.get("paired_t_p"))), number(p_cell(sig.get("paired_t_p_holm"))),
            number(p_cell(sig.get("wilcoxon_p"))), number(p_cell(sig.get("wilcoxon_p_holm"))),
            number(p_cell(sig.get("welch_p"))), number(p_cell(sig.get("welch_p_holm"))),
            number(p_cell(sig.get("mannwhitney_p"))), number(p_cell(sig.get("mannwhitney_p_holm"))),
            number(g_cell(sig.get("hedges_g")))]


def comparison_table(rows):
    return table(COLUMNS, [comparison_cells(row) for row in rows],
                 row_classes=["reference" if row["reference"] else "" for row in rows], id="comparison")


# ---------------------------------------------------------------- what produced it

def setting_text(value):
    if isinstance(value, (list, tuple)):
        return " ".join(setting_text(v) for v in value)
    return str(value)


def settings_overview(settings):
    """(common {key: text}, differing [key] (constant within each spec), per-run [key] (vary within a spec))."""
    every = [s for runs in settings.values() for s in runs]
    keys = sorted({key for s in every for key in s} - {"spec_name"})   # the spec column says it
    common, differing, per_run = {}, [], []
    for key in keys:
        texts = {setting_text(s.get(key, MISSING)) for s in every}
        if len(texts) == 1:
            common[key] = texts.pop()
        elif all(len({setting_text(s.get(key, MISSING)) for s in runs}) == 1 for runs in settings.values()):
            differing.append(key)
        else:
            per_run.append(key)
    return common, differing, per_run


def settings_section(settings):
    common, differing, per_run = settings_overview(settings)
    parts = [element("h3", "Settings that differ between specs")]
    if differing:
        rows = [[spec] + [setting_text(runs[0].get(key, MISSING)) for key in differing]
                for spec, runs in settings.items()]
        parts.append(table(["spec"] + differing, rows, id="settings-differing"))
    else:
        parts.append(element("p", "None: every spec ran with the same settings (apart from the spec name)."))
    if per_run:
        parts.append(element("p", esc("Vary between the runs of a spec: " + ", ".join(per_run) + "."),
                             class_="note"))
    parts.append(element("h3", "Settings common to all analysed runs"))
    parts.append(table(["setting", "value"], [[key, value] for key, value in common.items()], id="settings-common"))
    return "".join(parts)


def data_roots(exp_dir, run_settings):
    """Folders that may hold 1_data_<task>/: the experiment's PATH (EXP = PATH/3_output_cifar/<experiment>),
    then the runs' path_relative."""
    roots = [os.path.dirname(os.path.dirname(os.path.abspath(exp_dir)))]
    roots += [os.path.abspath(s["path_relative"]) for s in run_settings if s.get("path_relative")]
    return list(dict.fromkeys(roots))


def data_section(exp_dir, settings):
    """The data variant(s) of the analysed runs with their preprocessing sidecars, or where they were looked for."""
    every = [s for runs in settings.values() for s in runs]
    variants = sorted({(s.get("task", "cifar10"), s.get("preprocessing", "ztrans")) for s in every})
    parts = [element("h3", "Data")]
    for task, variant in variants:
        roots = data_roots(exp_dir, every)
        found = next((root for root in roots
                      if os.path.isfile(datasets.sidecar_path(datasets.output_paths(root, task, variant)[0]))), None)
        parts.append(element("p", esc(f"task {task}, preprocessing {variant}")))
        if found is None:
            tried = [datasets.sidecar_path(datasets.output_paths(root, task, variant)[0]) for root in roots]
            parts.append(element("p", esc("No preprocessing sidecar found (data prepared by an older "
                                          "preprocessing, or moved); looked for: " + ", ".join(tried)),
                                 class_="missing"))
            continue
        for pickle_path in datasets.output_paths(found, task, variant):
            parts.append(sidecar_table(datasets.sidecar_path(pickle_path)))
    return "".join(parts)


def sidecar_table(path):
    if not os.path.isfile(path):
        return element("p", esc(f"{path}: absent"), class_="missing")
    sidecar = load_json_object(path)
    if sidecar is None:
        return element("p", esc(f"{path}: unreadable (not a JSON object of at most {MAX_JSON_DEPTH} levels)"),
                       class_="missing")
    rows = [["file", path]]
    for key in ("variant", "split", "images_shape", "num_classes", "build", "written_by"):
        if key in sidecar:
            rows.append([key, setting_text(sidecar[key])])
    md5s = sidecar.get("source_md5")
    for name, md5 in sorted(md5s.items() if isinstance(md5s, dict) else []):
        rows.append([f"md5 of raw {name}", md5])
    if sidecar.get("parameters"):
        rows.append(["parameters", json.dumps(sidecar["parameters"], sort_keys=True)])
    return table(["sidecar", "value"], rows, class_="sidecar")


def git_state(folder):
    """'<commit> (clean working tree)' / '... (uncommitted changes)' of the suite's checkout, else why not."""
    def git(*args):
        return subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "not a git checkout"
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unknown (git: {err})"
    if status.returncode != 0:
        return f"{head.stdout.strip()} (could not tell whether the working tree is clean)"
    dirty = "uncommitted changes in the working tree" if status.stdout.strip() else "clean working tree"
    return f"{head.stdout.strip()} ({dirty})"


def package_version(*names):
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def kernel_section(kernels):
    """What the analysed runs' activations ran on: a row per implementation ('fused' with its build, or
    'plain: <why>') with the number of runs and their specs. kernels: spec -> [(kernel, build) per run]."""
    groups = {}
    for spec, runs in kernels.items():
        for kernel, build in runs:
            groups.setdefault((kernel or "not recorded (older run)", build or ""), []).append(spec)
    if not groups:
        return ""
    rows = [[kernel + (f" ({build})" if build else ""), str(len(specs)), ", ".join(dict.fromkeys(specs))]
            for (kernel, build), specs in sorted(groups.items())]
    mixed = len({kernel.split(":")[0] for kernel, _ in groups}) > 1
    note = ("Some runs used the plain composition of TensorFlow ops: same functions, equal to the fused kernel "
            "to about 1e-5, about 2x slower for ABU runs." if mixed else "")
    return (element("h3", "Activation implementation") + table(["implementation", "runs", "specs"], rows,
                                                               id="activation-kernel")
            + (element("p", esc(note), class_="missing") if note else ""))


def provenance_section(exp_dir, settings, kernels=None):
    suite = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = [["experiment folder", os.path.abspath(exp_dir)],
            ["suite", suite],
            ["suite git commit", git_state(suite)],
            ["TensorFlow", package_version("tensorflow", "tensorflow-cpu", "tensorflow_cpu", "tf-nightly")],
            ["numpy", np.__version__],
            ["scipy", package_version("scipy")],
            ["matplotlib", package_version("matplotlib")],
            ["Python", platform.python_version()],
            ["date", datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")]]
    return (element("h2", "What produced this report") + settings_section(settings) + data_section(exp_dir, settings)
            + kernel_section(kernels or {})
            + element("h3", "Software") + table(["", "at analysis time"], rows, id="software")
            + element("p", "Versions are those of the analysis environment; the runs' settings are the recorders'.",
                      class_="note"))


# ---------------------------------------------------------------- the page

def figure(path, caption, why_missing=None):
    if path and os.path.isfile(path):
        return element("figure", image(path, caption) + element("figcaption", esc(caption), class_="note"))
    return element("p", esc(f"{caption}: not available ({why_missing or 'no plot'})"), class_="missing")


def write_report(path, analysis):
    """Write the report of analysis (deepnet_analysis.ExperimentAnalysis) to path and return path."""
    exp_dir, reference, significance = analysis.exp_dir, analysis.reference, analysis.significance
    experiment = os.path.basename(os.path.normpath(exp_dir))
    rows = comparison_rows(analysis)
    parts = [element("h1", esc(f"Experiment {experiment}")),
             element("p", esc(f"{os.path.abspath(exp_dir)} — reference spec: {reference}"), class_="note"),
             element("h2", "Comparison"), comparison_table(rows),
             element("p", esc(LEAD), class_="note"),
             element("p", esc("Test accuracy over the analysed runs (std with ddof 0, as main_performance_analysis"
                              ".csv). Δ = mean(spec) − mean(reference) in percentage points with its 95 % "
                              "Welch–Satterthwaite interval; pairs: runs of the same number in both specs; p values "
                              "two-sided, each test Holm-corrected over all specs; Hedges' g with the small-sample "
                              "correction (significance.csv). Excluded: running, incomplete, unreadable or bad runs "
                              "(test accuracy in (0, 0.3)). Diverged: runs whose loss turned non-finite; they are "
                              "tested from the best checkpoint before the divergence (later validations count as 0, as "
                              "in the original) and counted."), class_="note")]
    if significance is None:
        parts.append(element("p", esc(f"No significance tests: the reference spec '{reference}' has no analysed run."),
                             class_="missing"))
    running = [f"{row['spec_name']} run {row['run']}" for row in analysis.excluded if row["category"] == "running"]
    if running:
        parts.append(element("p", esc(f"Still running, so not analysed: {', '.join(running)}. Analyse again once "
                                      "they have ended."), class_="missing"))
    notes = [f"{row['spec_name']} run {row['run']}: {row['reason']}" for row in analysis.excluded]
    notes += analysis.warnings
    notes += [f"{row['spec_name']} run {row['run']}: diverged at mb {row['diverged_at_mb']}; tested from mb "
              f"{row['early_stopping_mb']} and counted" for row in analysis.diverged]
    if notes:
        parts += [element("h3", "Runs left out, diverged runs and warnings"),
                  element("ul", "".join(element("li", esc(note)) for note in notes))]
    spec_plots = {result.spec: result.plots for result in analysis.analysed}
    parts += [element("h2", "Validation curves"),
              figure(analysis.experiment_plot, f"Mean validation accuracy over runs per spec ({experiment})",
                     "no analysed run"),
              element("h2", "Per spec"),
              element("p", " · ".join(element("a", esc(r["spec"]), href="#" + anchor(r["spec"]))
                                      for r in rows if r["spec"] in spec_plots))]
    for row in rows:
        plots = spec_plots.get(row["spec"])
        if plots is None:
            continue
        parts.append(element("h3", esc(row["spec"]) + (" (reference)" if row["reference"] else ""),
                             id=anchor(row["spec"])))
        for kind, caption in SPEC_PLOTS:
            plot_path, why = plots.get(kind, (None, "not made"))
            parts.append(figure(plot_path, f"{row['spec']}: {caption}", why))
    settings = {result.spec: result.settings for result in analysis.analysed}
    kernels = {result.spec: result.kernels for result in analysis.analysed}
    parts.append(provenance_section(exp_dir, settings, kernels))
    head = element("head", '<meta charset="utf-8">' + element("title", esc(f"{experiment}: analysis"))
                   + element("style", STYLE))
    save_text(path, "<!DOCTYPE html>\n" + element("html", head + element("body", "".join(parts)), lang="en") + "\n")
    return path
