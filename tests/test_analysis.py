"""deepnet_analysis on a hand-made experiment: every number against an independent computation."""
import itertools
import math
import os
import pickle
import statistics
import sys

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deepnet_analysis as da  # noqa: E402
from deepnet_util import UserError, load_pickle  # noqa: E402

N_MB, VAL_EVERY = 100, 10
LAYERS = ("conv1", "conv2", "conv3", "conv4", "dense1", "dense2")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# spec -> (af_set, blend_mode, {run: (test acc, early-stopping mb)})
SPECS = {
    "relu": ("1_relu", "unrestricted", {1: (0.70, 60), 2: (0.72, 70), 3: (0.69, 80), 4: (0.71, 100)}),
    "ABU": ("5_blend5_swish", "normalized", {1: (0.74, 50), 2: (0.73, 90), 5: (0.76, 40)}),
    "tanh": ("1_tanh", "unrestricted", {3: (0.60, 30)}),
}


def blend_weights(af_set, run, mb):
    n = int(af_set.split("_")[0])
    return np.linspace(0.2, 1.0, n) + 0.01 * run + 0.001 * mb


def af_entry(af_set, blend_mode, run, mb, layer_index):
    raw = blend_weights(af_set, run, mb) * (1 + 0.1 * layer_index)
    effective = raw / raw.sum() if blend_mode == "normalized" else raw
    beta = 1.0 + 0.05 * run if "swish" in af_set else None
    return {"blend_weights_raw": raw, "blend_weights": effective, "swish_beta": beta}


def fake_record(spec, run, test_acc, es_mb, af_set, blend_mode, **changes):
    rng = np.random.default_rng(100 * run + len(spec))
    val_mbs = list(range(0, N_MB + 1, VAL_EVERY))
    record = {
        "experiment_name": "exp", "spec_name": spec, "run": run,
        "settings": {"af_set": af_set, "blend_mode": blend_mode, "network": "smcn", "n_minibatches": N_MB,
                     "val_every": VAL_EVERY, "task": "cifar10"},
        "mbs_per_epoch": 20, "mb_count_total": N_MB, "ep_count_total": 5,
        "train_mb_n_hist": list(range(1, N_MB + 1)),
        "train_loss_hist": rng.uniform(0.5, 2, N_MB).tolist(),
        "train_top1_hist": rng.uniform(0.3, 0.95, N_MB).tolist(),
        "val_mb_n_hist": val_mbs,
        "val_loss_hist": rng.uniform(0.5, 2, len(val_mbs)).tolist(),
        "val_top1_hist": rng.uniform(0.3, 0.8, len(val_mbs)).tolist(),
        "val_top5_hist": rng.uniform(0.8, 1, len(val_mbs)).tolist(),
        "val_apc_hist": [rng.uniform(0, 1, 10) for _ in val_mbs],
        "val_af_weights_hist": [{layer: af_entry(af_set, blend_mode, run, mb, i) for i, layer in enumerate(LAYERS)}
                                for mb in val_mbs],
        "val_preact_stats_hist": [{layer: {"mean": 0.01 * mb + i, "std": 1 + 0.001 * mb * run}
                                   for i, layer in enumerate(LAYERS)} for mb in val_mbs],
        "checkpoints": val_mbs, "early_stopping_mb": es_mb, "val_top1_smoothed": [],
        "test_mb_n_hist": [es_mb], "test_loss": 1.0, "test_top1": test_acc, "test_top5": 0.95,
        "test_apc": rng.uniform(0, 1, 10), "training_completed": True, "test_completed": True,
        "diverged": False, "diverged_at_mb": None,
    }
    record.update(changes)
    return record


def write_record(exp, record):
    spec, run = record["spec_name"], record["run"]
    folder = os.path.join(exp, spec, f"run_{run}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"record_{spec}_run_{run}.pkl"), "wb") as handle:
        pickle.dump(record, handle)


def write_af_file(exp, spec, run, mb, af_set, blend_mode, scale):
    """An AF-weights file whose weights differ (by `scale`) from the recorder's history."""
    layers = {}
    for i, layer in enumerate(LAYERS):
        entry = af_entry(af_set, blend_mode, run, mb, i)
        entry["blend_weights_raw"] = entry["blend_weights_raw"] * scale
        layers[layer] = entry
    os.makedirs(os.path.join(exp, "0_af_weights"), exist_ok=True)
    path = os.path.join(exp, "0_af_weights", f"af_weights_{spec}_run_{run}_mb_{mb}.pkl")
    with open(path, "wb") as handle:
        pickle.dump({"af_set": af_set, "blend_mode": blend_mode, "mb": mb, "spec_name": spec, "run": run,
                     "layers": layers}, handle)


def build_experiment(exp):
    records = {}
    for spec, (af_set, mode, runs) in SPECS.items():
        for run, (acc, es) in runs.items():
            records[spec, run] = fake_record(spec, run, acc, es, af_set, mode)
            write_record(exp, records[spec, run])
    write_af_file(exp, "relu", 1, 60, "1_relu", "unrestricted", 2.0)
    write_af_file(exp, "relu", 2, 999, "1_relu", "unrestricted", 3.0)   # not the tested mb: ignored
    write_record(exp, fake_record("ABU", 6, 0.1, 40, "5_blend5_swish", "normalized", diverged=True,
                                  diverged_at_mb=33, test_completed=False))
    write_record(exp, fake_record("ABU", 7, 0.5, None, "5_blend5_swish", "normalized", test_completed=False,
                                  mb_count_total=40, test_top1=None))
    os.makedirs(os.path.join(exp, "ABU", "run_8"))
    with open(os.path.join(exp, "ABU", "run_8", "record_ABU_run_8.pkl"), "wb") as handle:
        handle.write(b"\x80\x04garbage")
    os.makedirs(os.path.join(exp, "selu", "run_1"))          # a spec without a recorder
    os.makedirs(os.path.join(exp, "0_summaries", "run_1"))   # 0_* folders are no specs
    # tanh run 3 saved no AF weights anywhere: its af_shapes plot is skipped
    tanh = records["tanh", 3]
    tanh["val_af_weights_hist"] = []
    write_record(exp, tanh)
    return records


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    exp = str(tmp_path_factory.mktemp("out") / "my_experiment")
    records = build_experiment(exp)
    lines = []
    result = da.analyse_experiment(exp, reference="relu", out=lines.append)
    return exp, records, result, lines


def read_csv(path):
    with open(path) as handle:
        rows = [line.rstrip("\n").split(";") for line in handle]
    return [dict(zip(rows[0], row)) for row in rows[1:]], rows[0]


def expected_metrics(record):
    es = record["early_stopping_mb"]
    train = record["train_top1_hist"][es - VAL_EVERY:es]          # minibatches es-9 .. es
    val = record["val_top1_hist"][record["val_mb_n_hist"].index(es)]
    return statistics.fmean(train), val, record["test_top1"], es


def spec_values(records, spec):
    runs = sorted(SPECS[spec][2])
    return [expected_metrics(records[spec, run]) for run in runs]


def close(text, expected):
    if expected is None or (isinstance(expected, float) and math.isnan(expected)):
        return text == "nan"
    return math.isclose(float(text), expected, rel_tol=1e-12, abs_tol=1e-15)


# ---------------------------------------------------------------- tables

def test_performance_table_matches_independent_statistics(analysed):
    exp, records, _, _ = analysed
    rows, header = read_csv(os.path.join(exp, "0_analysis", "main_performance_analysis.csv"))
    assert [row["spec_name"] for row in rows] == ["ABU", "relu", "tanh"]
    for name in ("test acc [mean]", "test acc [median]", "val acc [max]", "train acc [var]", "es mb [std]"):
        assert name in header
    for row in rows:
        values = spec_values(records, row["spec_name"])
        assert int(row["n_runs"]) == len(values)
        for kind, column in (("train", 0), ("val", 1), ("test", 2)):
            v = [x[column] for x in values]
            several = len(v) > 1
            assert close(row[f"{kind} acc [mean]"], statistics.fmean(v))
            assert close(row[f"{kind} acc [median]"], statistics.median(v))
            assert close(row[f"{kind} acc [var]"], statistics.variance(v) if several else None)
            assert close(row[f"{kind} acc [std]"], statistics.stdev(v) if several else None)
            assert close(row[f"{kind} acc [max]"], max(v))
            assert close(row[f"{kind} acc [min]"], min(v))
        es = [x[3] for x in values]
        assert close(row["es mb [mean]"], statistics.fmean(es))
        assert close(row["es mb [std]"], statistics.stdev(es) if len(es) > 1 else None)


def welch_reference(a, b):
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return 2 * stats.t.sf(abs(t), df)


def mannwhitney_exact(a, b):
    """Exact two-sided p by enumerating every assignment of the pooled values (no ties)."""
    pooled = list(a) + list(b)
    u_of = lambda xs, ys: sum(x > y for x in xs for y in ys)  # noqa: E731
    u = u_of(a, b)
    extreme = max(u, len(a) * len(b) - u)
    counts = [u_of([pooled[i] for i in idx], [pooled[i] for i in range(len(pooled)) if i not in idx])
              for idx in itertools.combinations(range(len(pooled)), len(a))]
    return min(1.0, 2 * sum(c >= extreme for c in counts) / len(counts))


def hedges_reference(a, b):
    n1, n2 = len(a), len(b)
    pooled = math.sqrt(((n1 - 1) * statistics.variance(a) + (n2 - 1) * statistics.variance(b)) / (n1 + n2 - 2))
    return (1 - 3 / (4 * (n1 + n2) - 9)) * (statistics.fmean(a) - statistics.fmean(b)) / pooled


def test_significance_table_matches_independent_tests(analysed):
    exp, records, _, lines = analysed
    rows, header = read_csv(os.path.join(exp, "0_analysis", "significance.csv"))
    for name in ("spec_name", "n", "mean_diff", "welch_p", "mannwhitney_p", "welch_p_holm",
                 "mannwhitney_p_holm", "hedges_g"):
        assert name in header
    by_spec = {row["spec_name"]: row for row in rows}
    assert set(by_spec) == {"ABU", "tanh"}
    ref = [x[2] for x in spec_values(records, "relu")]
    abu = [x[2] for x in spec_values(records, "ABU")]
    row = by_spec["ABU"]
    assert int(row["n"]) == 3
    assert close(row["mean_diff"], statistics.fmean(abu) - statistics.fmean(ref))
    assert math.isclose(float(row["welch_p"]), welch_reference(abu, ref), rel_tol=1e-9)
    assert math.isclose(float(row["welch_p"]), stats.ttest_ind(abu, ref, equal_var=False).pvalue, rel_tol=1e-12)
    assert math.isclose(float(row["mannwhitney_p"]), mannwhitney_exact(abu, ref), rel_tol=1e-12)
    assert math.isclose(float(row["hedges_g"]), hedges_reference(abu, ref), rel_tol=1e-12)
    # only ABU has p values (tanh has one run), so Holm over one test leaves them as they are
    assert close(row["welch_p_holm"], float(row["welch_p"]))
    assert close(row["mannwhitney_p_holm"], float(row["mannwhitney_p"]))
    tanh = by_spec["tanh"]
    assert int(tanh["n"]) == 1
    for name in ("welch_p", "mannwhitney_p", "welch_p_holm", "mannwhitney_p_holm", "hedges_g"):
        assert tanh[name] == "nan"
    assert close(tanh["mean_diff"], 0.60 - statistics.fmean(ref))
    assert any("fewer than 2" in line and "tanh" in line for line in lines)


def test_holm_against_hand_computed_examples():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06
    assert np.allclose(da.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    assert np.allclose(da.holm([0.6, 0.7]), [1.0, 1.0])                        # capped at 1
    adjusted = da.holm([math.nan, 0.5, 0.3])                                    # NaN not counted
    assert math.isnan(adjusted[0]) and np.allclose(adjusted[1:], [0.6, 0.6])
    assert np.allclose(da.holm([0.02, 0.02]), [0.04, 0.04])                     # ties
    assert np.allclose(da.holm([0.2]), [0.2])


def test_excluded_runs_are_named_with_reasons(analysed):
    exp, _, result, lines = analysed
    rows, _ = read_csv(os.path.join(exp, "0_analysis", "excluded_runs.csv"))
    reasons = {(row["spec_name"], row["run"]): row["reason"] for row in rows}
    assert set(reasons) == {("ABU", "6"), ("ABU", "7"), ("ABU", "8"), ("selu", "1")}
    assert "diverged at minibatch 33" in reasons["ABU", "6"]
    assert "incomplete" in reasons["ABU", "7"] and "40 of 100" in reasons["ABU", "7"]
    assert "unreadable" in reasons["ABU", "8"]
    assert reasons["selu", "1"] == "no recorder file"
    for spec, run in reasons:
        assert sum(line.startswith(f"excluded: {spec} run {run}:") for line in lines) == 1
    assert len(result["excluded"]) == 4


def test_printed_summary_table(analysed):
    exp, records, _, lines = analysed
    table = next(line for line in lines if line.startswith("spec"))
    rows = {line.split()[0]: line for line in table.splitlines()[1:]}
    ref = [x[2] for x in spec_values(records, "relu")]
    assert f"{100 * statistics.fmean(ref):.2f} ± {100 * statistics.stdev(ref):.2f}" in rows["relu"]
    assert "(reference)" in rows["relu"]
    abu = [x[2] for x in spec_values(records, "ABU")]
    assert f"{100 * (statistics.fmean(abu) - statistics.fmean(ref)):+.2f}" in rows["ABU"]
    assert lines[-1] == f"tables, plots and summaries: {os.path.join(exp, '0_analysis')}"


# ---------------------------------------------------------------- plots and summaries

def test_plots_are_valid_pngs(analysed):
    import matplotlib.image
    exp, _, _, lines = analysed
    folder = os.path.join(exp, "0_analysis")
    expected = ["PA_my_experiment.png"]
    for spec in ("relu", "ABU", "tanh"):
        expected += [f"performance_analysis_{spec}.png", f"all_runs_{spec}.png",
                     f"preactivation_stats_{spec}.png"]
    expected += ["af_shapes_relu.png", "af_shapes_ABU.png", "blend_weights_relu.png", "blend_weights_ABU.png"]
    for name in expected:
        path = os.path.join(folder, name)
        with open(path, "rb") as handle:
            assert handle.read(8) == PNG_MAGIC, name
        assert os.path.getsize(path) > 1000
        assert matplotlib.image.imread(path).ndim == 3
    for name in ("af_shapes_tanh.png", "blend_weights_tanh.png"):
        assert not os.path.exists(os.path.join(folder, name))
        assert sum(line.startswith(f"skipped {name}") for line in lines) == 1


def test_summary_pickles_hold_the_numbers(analysed):
    exp, records, _, _ = analysed
    summary = load_pickle(os.path.join(exp, "0_analysis", "performance_summary_ABU.pkl"))
    values = spec_values(records, "ABU")
    assert summary["runs"] == [1, 2, 5]
    assert np.allclose(summary["test_acc"], [x[2] for x in values])
    assert np.allclose(summary["train_acc"], [x[0] for x in values])
    assert summary["early_stopping_mb"] == [50, 90, 40]
    assert math.isclose(summary["val_acc_stats"]["median"], statistics.median([x[1] for x in values]))
    curve = summary["val_curve"]
    matrix = np.array([records["ABU", run]["val_top1_hist"] for run in (1, 2, 5)])
    assert list(curve["mb"]) == list(range(0, N_MB + 1, VAL_EVERY))
    assert np.allclose(curve["mean"], matrix.mean(0)) and np.allclose(curve["max"], matrix.max(0))
    assert summary["significance"]["spec_name"] == "ABU"


def test_af_curves_against_formulas(analysed):
    exp, records, _, _ = analysed
    x = da.AF_X
    # relu run 1: the AF-weights file (weights x2) wins over the recorder; run 2's file is for another mb
    weights = [da.tested_af_weights(exp, "relu", run, records["relu", run]) for run in (1, 2)]
    w1 = blend_weights("1_relu", 1, 60)[0] * 2.0 * 1.1
    w2 = blend_weights("1_relu", 2, 70)[0] * 1.1
    curves = da.af_curves([records["relu", 1], records["relu", 2]], weights, ["conv2"])
    assert np.allclose(curves["conv2"], [w1 * np.maximum(x, 0), w2 * np.maximum(x, 0)])
    # ABU, normalized: w/sum(w) * (relu, elu, tanh, x sigmoid(beta x), x)
    record = records["ABU", 5]
    entry = da.tested_af_weights(exp, "ABU", 5, record)["dense1"]
    raw = blend_weights("5_blend5_swish", 5, 40) * 1.4
    w = raw / raw.sum()
    beta = 1.25
    elu = np.where(x > 0, x, np.exp(np.minimum(x, 0)) - 1)
    expected = (w[0] * np.maximum(x, 0) + w[1] * elu + w[2] * np.tanh(x)
                + w[3] * x / (1 + np.exp(-beta * x)) + w[4] * x)
    assert np.allclose(da.af_curves([record], [{"dense1": entry}], ["dense1"])["dense1"][0], expected)


def test_curves_on_a_common_grid():
    grid, matrix = da.on_common_grid([([0, 10, 20], [0.1, 0.2, 0.3]), ([0, 20], [0.5, 0.7])])
    assert list(grid) == [0, 10, 20]
    mean, low, high = da.band(matrix)
    assert np.allclose(mean, [0.3, 0.2, 0.5]) and np.allclose(low, [0.1, 0.2, 0.3])
    assert np.allclose(high, [0.5, 0.2, 0.7])


# ---------------------------------------------------------------- bad input

def test_missing_and_empty_experiments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        da.analyse_experiment(str(tmp_path / "nope"), out=lambda line: None)
    os.makedirs(tmp_path / "empty" / "relu")
    with pytest.raises(UserError, match="holds no runs"):
        da.analyse_experiment(str(tmp_path / "empty"), out=lambda line: None)
    assert not os.path.exists(tmp_path / "empty" / "0_analysis")


def test_no_complete_run_and_missing_reference(tmp_path):
    exp = str(tmp_path / "exp")
    write_record(exp, fake_record("relu", 1, 0.5, None, "1_relu", "unrestricted", test_completed=False))
    lines = []
    with pytest.raises(UserError, match="no complete run"):
        da.analyse_experiment(exp, out=lines.append)
    assert lines == ["excluded: relu run 1: incomplete: test not done (trained 100 of 100 minibatches)"]
    write_record(exp, fake_record("tanh", 1, 0.5, 50, "1_tanh", "unrestricted"))
    write_record(exp, fake_record("tanh", 2, 0.6, 60, "1_tanh", "unrestricted"))
    lines = []
    result = da.analyse_experiment(exp, reference="relu", out=lines.append)
    assert result["significance"] is None
    assert sum("reference spec 'relu'" in line and "significance.csv not written" in line for line in lines) == 1
    assert not os.path.exists(os.path.join(exp, "0_analysis", "significance.csv"))
    rows, _ = read_csv(os.path.join(exp, "0_analysis", "main_performance_analysis.csv"))
    assert [row["spec_name"] for row in rows] == ["tanh"]
