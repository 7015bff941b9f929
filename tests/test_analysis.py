"""deepnet_analysis on a hand-made experiment: every number against an independent computation.

The original research code's statistics (deepnet_task_cifar.py: __get_statistics, __remove_double_logs, the
run loop of __spec_analysis and the CSV row of analysis) are transcribed below, not imported.
"""
import base64
import glob
import html.parser
import io
import itertools
import json
import math
import os
import pickle
import re
import statistics
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deepnet import figures, results, run_statistics  # noqa: E402
import deepnet_analysis as da  # noqa: E402
from deepnet_util import UserError, load_pickle  # noqa: E402

N_MB, VAL_EVERY = 100, 10
LAYERS = ("conv1", "conv2", "conv3", "conv4", "dense5", "dense6")   # contract names of smcn
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEST_AF_SCALE = 1.5          # recorder['test_af_weights'] = history weights x this, so its use is visible
RAW_MD5 = {"train_batches/data_batch_1": "0123456789abcdef0123456789abcdef",
           "test_batches/test_batch": "fedcba9876543210fedcba9876543210"}

# spec -> (af_set, blend_mode, {run: (test acc, early-stopping mb)})
SPECS = {
    "relu": ("1_relu", "unrestricted", {1: (0.70, 60), 2: (0.72, 70), 3: (0.69, 80), 4: (0.71, 100)}),
    "ABU": ("5_blend5_swish", "normalized", {1: (0.74, 50), 2: (0.73, 90), 5: (0.76, 40)}),
    "tanh": ("1_tanh", "unrestricted", {3: (0.60, 30)}),
}
BAD_RUN = ("ABU", 9, 0.2, 60)         # test acc in (0, 0.3): excluded as in the original
DIVERGED_RUN = ("relu", 3, 85)        # diverged at mb 85, tested from its early-stopping mb 80: analysed
HIGH_VAL_RUN = ("relu", 4)            # mean val acc above 0.95: warned about, kept
REPEATED_VAL_RUN = ("ABU", 2)         # a repeated validation at mb 60 with a high value the original drops


def blend_weights(af_set, run, mb):
    n = int(af_set.split("_")[0])
    return np.linspace(0.2, 1.0, n) + 0.01 * run + 0.001 * mb


def af_entry(af_set, blend_mode, run, mb, layer_index, scale=1.0):
    raw = blend_weights(af_set, run, mb) * (1 + 0.1 * layer_index) * scale
    effective = raw / raw.sum() if blend_mode == "normalized" else raw
    beta = 1.0 + 0.05 * run if "swish" in af_set else None
    return {"blend_weights_raw": raw, "blend_weights": effective, "swish_beta": beta}


def fake_record(spec, run, test_acc, es_mb, af_set, blend_mode, **changes):
    """A recorder as the contract describes it (layer names of the original, test_af_weights, xentropy keys)."""
    rng = np.random.default_rng(100 * run + len(spec))
    val_mbs = list(range(0, N_MB + 1, VAL_EVERY))
    record = {
        "experiment_name": "exp", "spec_name": spec, "run": run,
        "settings": {"af_set": af_set, "blend_mode": blend_mode, "network": "smcn", "n_minibatches": N_MB,
                     "val_every": VAL_EVERY, "task": "cifar10", "preprocessing": "ztrans", "path_relative": "/nonexistent",
                     "spec_name": spec, "run": run, "seed": run, "lr": 0.001, "dropout_keep_probs": [0.5]},
        "mbs_per_epoch": 20, "mb_count_total": N_MB, "ep_count_total": 5,
        "train_mb_n_hist": list(range(1, N_MB + 1)),
        "train_loss_hist": rng.uniform(0.5, 2, N_MB).tolist(),
        "train_xentropy_hist": rng.uniform(0.5, 2, N_MB).tolist(),
        "train_top1_hist": rng.uniform(0.3, 0.95, N_MB).tolist(),
        "val_mb_n_hist": val_mbs,
        "val_loss_hist": rng.uniform(0.5, 2, len(val_mbs)).tolist(),
        "val_xentropy_hist": rng.uniform(0.5, 2, len(val_mbs)).tolist(),
        "val_top1_hist": rng.uniform(0.3, 0.8, len(val_mbs)).tolist(),
        "val_top5_hist": rng.uniform(0.8, 1, len(val_mbs)).tolist(),
        "val_apc_hist": [rng.uniform(0, 1, 10) for _ in val_mbs],
        "val_af_weights_hist": [{layer: af_entry(af_set, blend_mode, run, mb, i) for i, layer in enumerate(LAYERS)}
                                for mb in val_mbs],
        "val_preact_stats_hist": [{layer: {"mean": 0.01 * mb + i, "std": 1 + 0.001 * mb * run}
                                   for i, layer in enumerate(LAYERS)} for mb in val_mbs],
        "checkpoints": val_mbs, "early_stopping_mb": es_mb, "val_top1_smoothed": [],
        "test_mb_n_hist": [es_mb], "test_loss": float(rng.uniform(0.5, 1.5)), "test_xentropy": 0.9,
        "test_top1": test_acc, "test_top5": 0.95, "test_apc": rng.uniform(0, 1, 10),
        "test_af_weights": None if es_mb is None else
        {layer: af_entry(af_set, blend_mode, run, es_mb, i, TEST_AF_SCALE) for i, layer in enumerate(LAYERS)},
        "training_completed": True, "test_completed": True, "diverged": False, "diverged_at_mb": None,
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
    """An AF-weights file in the suite's old format whose weights differ (by `scale`) from the history."""
    layers = {layer: af_entry(af_set, blend_mode, run, mb, i, scale) for i, layer in enumerate(LAYERS)}
    os.makedirs(os.path.join(exp, "0_af_weights"), exist_ok=True)
    path = os.path.join(exp, "0_af_weights", f"af_weights_{spec}_run_{run}_mb_{mb}.pkl")
    with open(path, "wb") as handle:
        pickle.dump({"af_set": af_set, "blend_mode": blend_mode, "mb": mb, "spec_name": spec, "run": run,
                     "layers": layers}, handle)


def write_sidecars(root):
    for split in ("train", "test"):
        folder = os.path.join(root, "1_data_cifar10", f"{split}_set_ztrans")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"cifar10_{split}set.json"), "w") as handle:
            json.dump({"task": "cifar10", "variant": "ztrans", "split": split, "images_shape": [50, 32, 32, 3],
                       "num_classes": 10, "source_md5": RAW_MD5, "parameters": {"std_floor": 0.018},
                       "written_by": "deepnet_task_cifar_preprocessing.py"}, handle)


def build_experiment(exp):
    """The analysed experiment; returns {(spec, run): recorder} of every run that should be analysed."""
    records = {}
    for spec, (af_set, mode, runs) in SPECS.items():
        for run, (acc, es) in runs.items():
            records[spec, run] = fake_record(spec, run, acc, es, af_set, mode)
    # relu runs 1 and 2 are old recorders (no test_af_weights): run 1 has an old AF-weights file (x2),
    # run 2's file is for another minibatch (ignored, so the history at mb 70 is used)
    records["relu", 1]["test_af_weights"] = records["relu", 2]["test_af_weights"] = None
    write_af_file(exp, "relu", 1, 60, "1_relu", "unrestricted", 2.0)
    write_af_file(exp, "relu", 2, 999, "1_relu", "unrestricted", 3.0)
    high = records[HIGH_VAL_RUN]
    high["val_top1_hist"] = [0.96 + 0.001 * i for i in range(len(high["val_mb_n_hist"]))]
    repeated = records[REPEATED_VAL_RUN]
    at = repeated["val_mb_n_hist"].index(60) + 1
    for key, value in (("val_mb_n_hist", 60), ("val_top1_hist", 0.99), ("val_loss_hist", 0.01)):
        repeated[key].insert(at, value)
    for key in ("val_top5_hist", "val_apc_hist", "val_af_weights_hist", "val_preact_stats_hist"):
        repeated[key].insert(at, repeated[key][at - 1])
    # tanh run 3 saved no AF weights anywhere: its af_shapes plot is skipped
    records["tanh", 3]["val_af_weights_hist"] = []
    records["tanh", 3]["test_af_weights"] = None
    records[DIVERGED_RUN[:2]].update(diverged=True, diverged_at_mb=DIVERGED_RUN[2])
    for record in records.values():
        write_record(exp, record)
    spec, run, acc, es = BAD_RUN
    write_record(exp, fake_record(spec, run, acc, es, "5_blend5_swish", "normalized"))
    write_record(exp, fake_record("ABU", 6, 0.1, 40, "5_blend5_swish", "normalized", diverged=True,
                                  diverged_at_mb=33, test_completed=False))
    write_record(exp, fake_record("ABU", 7, 0.5, None, "5_blend5_swish", "normalized", test_completed=False,
                                  mb_count_total=40, test_top1=None))
    os.makedirs(os.path.join(exp, "ABU", "run_8"))
    with open(os.path.join(exp, "ABU", "run_8", "record_ABU_run_8.pkl"), "wb") as handle:
        handle.write(b"\x80\x04garbage")
    os.makedirs(os.path.join(exp, "selu", "run_1"))          # a spec without a recorder
    os.makedirs(os.path.join(exp, "0_summaries", "run_1"))   # 0_* folders are no specs
    return records


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("root"))
    exp = os.path.join(root, "3_output_cifar", "my_experiment")
    records = build_experiment(exp)
    write_sidecars(root)
    lines = []
    result = da.analyse_experiment(exp, reference="relu", out=lines.append)
    return exp, records, result, lines


def read_csv(path):
    with open(path) as handle:
        rows = [line.rstrip("\n").split(";") for line in handle]
    return [dict(zip(rows[0], row)) for row in rows[1:]], rows[0]


def spec_runs(spec):
    return sorted(SPECS[spec][2])


def close(text, expected):
    if expected is None or (isinstance(expected, float) and math.isnan(expected)):
        return text == "nan"
    return math.isclose(float(text), expected, rel_tol=1e-12, abs_tol=1e-15)


# ---------------------------------------------------------------- the original, transcribed

def original_remove_double_logs(vmb_hist, vt1_hist, vlo_hist):
    vmb_new, vt1_new, vlo_new = [], [], []
    for i in range(len(vmb_hist)):
        if not vmb_hist[i] in vmb_new:
            vmb_new.append(vmb_hist[i])
            vt1_new.append(vt1_hist[i])
            vlo_new.append(vlo_hist[i])
    return vmb_new, vt1_new, vlo_new


def original_get_statistics(data_array):
    assert len(data_array.shape) == 2
    run_max_list = []
    run_min_list = []
    for i in range(data_array.shape[0]):
        run = data_array[i, :]
        run_max_list.append(np.max(run))
        run_min_list.append(np.min(run))
    himax_run_idx = np.argmax(np.array(run_max_list))
    lomax_run_idx = np.argmin(np.array(run_max_list))
    himin_run_idx = np.argmax(np.array(run_min_list))
    lomin_run_idx = np.argmin(np.array(run_min_list))
    median_run_idx = np.argsort(np.array(run_min_list))[len(np.array(run_min_list)) // 2]
    return (data_array[median_run_idx, :], data_array[himax_run_idx, :], data_array[lomax_run_idx, :],
            data_array[himin_run_idx, :], data_array[lomin_run_idx, :], np.mean(data_array, axis=0),
            np.std(data_array, axis=0), np.var(data_array, axis=0), run_max_list, run_min_list)


def original_spec_analysis(recs):
    """__spec_analysis's run loop and dictionary for the given recorders (test_top1 a float here, not a list)."""
    printed, train_mb, train_top1, train_loss, val_mb, val_top1, val_loss, test_mb, test_loss, test_top1 = \
        [], [], [], [], [], [], [], [], [], []
    for rec_dict in recs:
        n_val_samples = len(rec_dict["val_mb_n_hist"])
        run_val_mean = np.mean(rec_dict["val_top1_hist"])
        test_t1 = rec_dict["test_top1"]
        if (n_val_samples > 0) and (run_val_mean > .95 or run_val_mean < .3):
            printed.append(("val", rec_dict["spec_name"], rec_dict["run"]))
        if test_t1 and test_t1 > 0. and test_t1 < .3:
            printed.append(("test", rec_dict["spec_name"], rec_dict["run"]))
        else:
            train_mb.append(np.array(rec_dict["train_mb_n_hist"]))
            train_top1.append(np.array(rec_dict["train_top1_hist"]))
            train_loss.append(np.array(rec_dict["train_loss_hist"]))
            test_mb.append(rec_dict["test_mb_n_hist"])
            test_loss.append(rec_dict["test_loss"])
            test_top1.append(rec_dict["test_top1"])
            vmb, vt1, vlo = original_remove_double_logs(rec_dict["val_mb_n_hist"], rec_dict["val_top1_hist"],
                                                        rec_dict["val_loss_hist"])
            val_mb.append(np.array(vmb))
            val_top1.append(np.array(vt1))
            val_loss.append(np.array(vlo))
    t_median_run, t_himax_run, t_lomax_run, _, _, t_mean_run, t_std_run, t_var_run, t_run_max_list, _ = \
        original_get_statistics(np.array(train_top1))
    t_loss_median_run, _, _, t_loss_himin_run, t_loss_lomin_run, t_loss_mean_run, t_loss_std_run, t_loss_var_run, \
        _, t_loss_run_min_list = original_get_statistics(np.array(train_loss))
    v_median_run, v_himax_run, v_lomax_run, _, _, v_mean_run, v_std_run, v_var_run, v_run_max_list, _ = \
        original_get_statistics(np.array(val_top1))
    v_loss_median_run, _, _, v_loss_himin_run, v_loss_lomin_run, v_loss_mean_run, v_loss_std_run, v_loss_var_run, \
        _, v_loss_run_min_list = original_get_statistics(np.array(val_loss))
    summary = {"n_runs": len(test_top1), "t_mb": np.array(train_mb)[0, :], "v_mb": np.array(val_mb)[0, :],
               "t_top1_median_run": t_median_run, "t_top1_himax_run": t_himax_run, "t_top1_lomax_run": t_lomax_run,
               "t_top1_mean_run": t_mean_run, "t_top1_std_run": t_std_run, "t_top1_var_run": t_var_run,
               "t_loss_median_run": t_loss_median_run, "t_loss_himin_run": t_loss_himin_run,
               "t_loss_lomin_run": t_loss_lomin_run, "t_loss_mean_run": t_loss_mean_run,
               "t_loss_std_run": t_loss_std_run, "t_loss_var_run": t_loss_var_run,
               "v_top1_median_run": v_median_run, "v_top1_himax_run": v_himax_run, "v_top1_lomax_run": v_lomax_run,
               "v_top1_mean_run": v_mean_run, "v_top1_std_run": v_std_run, "v_top1_var_run": v_var_run,
               "v_loss_median_run": v_loss_median_run, "v_loss_himin_run": v_loss_himin_run,
               "v_loss_lomin_run": v_loss_lomin_run, "v_loss_mean_run": v_loss_mean_run,
               "v_loss_std_run": v_loss_std_run, "v_loss_var_run": v_loss_var_run,
               "test_mb_n_hist": test_mb, "test_mb_n_min": np.amin(test_mb), "test_mb_n_max": np.amax(test_mb),
               "test_mb_n_mean": np.mean(test_mb), "test_mb_n_median": np.median(test_mb),
               "test_mb_n_std": np.std(test_mb)}
    for prefix, values in (("t_loss_run_min", t_loss_run_min_list), ("t_top1_run_max", t_run_max_list),
                           ("v_loss_run_min", v_loss_run_min_list), ("v_top1_run_max", v_run_max_list),
                           ("test_loss", test_loss), ("test_top1", test_top1)):
        summary[f"{prefix}_list"] = values
        summary.update({f"{prefix}_median": np.median(values), f"{prefix}_max": np.max(values),
                        f"{prefix}_min": np.min(values), f"{prefix}_mean": np.mean(values),
                        f"{prefix}_var": np.var(values), f"{prefix}_std": np.std(values)})
    return summary, printed


def original_csv_row(spec, d):
    """The original analysis()'s writer.writerow for one spec, as (column, value) pairs."""
    columns = ["spec_name", "n_runs", "test / e.s. mb [mean]", "test / e.s. mb [std]",
               "train acc [median]", "train acc [mean]", "train acc [var]", "train acc [std]", "train acc [max]",
               "train acc [min]", "val acc [median]", "val acc [mean]", "val acc [var]", "val acc [std]",
               "val acc [max]", "val acc [min]", "test acc [median]", "test acc [mean]", "test acc [var]",
               "test acc [std]", "test acc [max]", "test acc [min]"]
    values = [spec, d["n_runs"], d["test_mb_n_mean"], d["test_mb_n_std"],
              d["t_top1_run_max_median"], d["t_top1_run_max_mean"], d["t_top1_run_max_var"],
              d["t_top1_run_max_std"], d["t_top1_run_max_max"], d["t_top1_run_max_min"],
              d["v_top1_run_max_median"], d["v_top1_run_max_mean"], d["v_top1_run_max_var"],
              d["v_top1_run_max_std"], d["v_top1_run_max_max"], d["v_top1_run_max_min"],
              d["test_top1_median"], d["test_top1_mean"], d["test_top1_var"], d["test_top1_std"],
              d["test_top1_max"], d["test_top1_min"]]
    return list(zip(columns, values))


def original_of(exp, spec, records):
    """The original's numbers for a spec, fed with every complete recorder of it (the bad run included)."""
    complete = [records[spec, run] for run in spec_runs(spec)]
    if spec == BAD_RUN[0]:
        complete.append(load_pickle(results.recorder_path(exp, spec, BAD_RUN[1])))
    return original_spec_analysis(complete)


# ---------------------------------------------------------------- per-run values at the tested minibatch

def at_es(record):
    """(train acc, val acc) at early_stopping_mb as the module docstring defines them, computed by hand."""
    es = record["early_stopping_mb"]
    train = record["train_top1_hist"][es - VAL_EVERY:es]          # minibatches es-9 .. es
    val = record["val_top1_hist"][record["val_mb_n_hist"].index(es)]
    return statistics.fmean(train), val


# ---------------------------------------------------------------- tables

def test_performance_table_matches_the_original(analysed):
    exp, records, _, lines = analysed
    rows, header = read_csv(os.path.join(exp, "0_analysis", "main_performance_analysis.csv"))
    assert [row["spec_name"] for row in rows] == ["ABU", "relu", "tanh"]
    original_columns = [name for name, _ in original_csv_row("x", original_of(exp, "tanh", records)[0])]
    assert header[:22] == original_columns
    assert header[22:-1] == [f"{kind} acc at e.s. mb [{name}]" for kind in ("train", "val")
                             for name in ("median", "mean", "var", "std", "max", "min")]
    assert header[-1] == "diverged runs"
    assert {row["spec_name"]: row["diverged runs"] for row in rows} == {
        "ABU": "", "relu": "run 3 diverged at mb 85", "tanh": ""}  # ABU run 6 diverged untested: excluded
    for row in rows:
        spec = row["spec_name"]
        original, _ = original_of(exp, spec, records)
        for column, value in original_csv_row(spec, original):
            assert row[column] == value if column == "spec_name" else close(row[column], float(value)), column
    abu = {row["spec_name"]: row for row in rows}["ABU"]
    assert abu["n_runs"] == "3"                                    # the bad run 9 is not counted
    # the repeated validation (0.99 at mb 60) is dropped before the run maximum, as in the original
    assert float(abu["val acc [max]"]) < 0.99
    # the run maximum over the whole run, not the value at the tested minibatch
    run_max = [max(records["relu", run]["train_top1_hist"]) for run in spec_runs("relu")]
    relu = {row["spec_name"]: row for row in rows}["relu"]
    assert close(relu["train acc [mean]"], statistics.fmean(run_max))
    assert close(relu["train acc [std]"], statistics.pstdev(run_max))        # ddof 0
    assert close(relu["test / e.s. mb [std]"], statistics.pstdev([60, 70, 80, 100]))
    assert close({row["spec_name"]: row for row in rows}["tanh"]["test acc [std]"], 0.0)


def test_values_at_the_early_stopping_minibatch_are_extra_columns(analysed):
    exp, records, _, _ = analysed
    rows, _ = read_csv(os.path.join(exp, "0_analysis", "main_performance_analysis.csv"))
    for row in rows:
        values = [at_es(records[row["spec_name"], run]) for run in spec_runs(row["spec_name"])]
        for kind, column in (("train", 0), ("val", 1)):
            v = [x[column] for x in values]
            prefix = f"{kind} acc at e.s. mb"
            assert close(row[f"{prefix} [mean]"], statistics.fmean(v))
            assert close(row[f"{prefix} [median]"], statistics.median(v))
            assert close(row[f"{prefix} [var]"], statistics.pvariance(v))
            assert close(row[f"{prefix} [std]"], statistics.pstdev(v))
            assert close(row[f"{prefix} [max]"], max(v))
            assert close(row[f"{prefix} [min]"], min(v))


def test_summary_pickles_hold_the_originals_keys_and_the_suites(analysed):
    exp, records, _, _ = analysed
    for spec in ("relu", "ABU", "tanh"):
        summary = load_pickle(os.path.join(exp, "0_analysis", f"performance_summary_{spec}.pkl"))
        original, _ = original_of(exp, spec, records)
        assert summary["spec_name"] == spec
        for key, expected in original.items():
            if key == "test_mb_n_hist":
                assert summary[key] == expected
            else:
                assert np.allclose(summary[key], expected, rtol=1e-12, atol=0), (spec, key)
    summary = load_pickle(os.path.join(exp, "0_analysis", "performance_summary_ABU.pkl"))
    values = [at_es(records["ABU", run]) for run in (1, 2, 5)]
    assert summary["runs"] == [1, 2, 5]
    assert np.allclose(summary["test_acc"], [0.74, 0.73, 0.76])
    assert np.allclose(summary["train_acc"], [x[0] for x in values])
    assert summary["early_stopping_mb"] == [50, 90, 40]
    assert math.isclose(summary["val_acc_stats"]["median"], statistics.median([x[1] for x in values]))
    assert [row["run"] for row in summary["excluded"]] == [6, 7, 8, 9]
    assert summary["significance"]["spec_name"] == "ABU"
    curve = load_pickle(os.path.join(exp, "0_analysis", "performance_summary_relu.pkl"))["val_curve"]
    matrix = np.array([records["relu", run]["val_top1_hist"] for run in spec_runs("relu")])
    assert list(curve["mb"]) == list(range(0, N_MB + 1, VAL_EVERY))
    assert np.allclose(curve["mean"], matrix.mean(0)) and np.allclose(curve["max"], matrix.max(0))


def test_bad_run_is_excluded_and_the_val_mean_run_only_warned_about(analysed):
    exp, records, result, lines = analysed
    rows, header = read_csv(os.path.join(exp, "0_analysis", "excluded_runs.csv"))
    assert header == ["spec_name", "run", "category", "reason", "recorder"]
    bad = {(row["spec_name"], row["run"]): row for row in rows}[BAD_RUN[0], str(BAD_RUN[1])]
    assert bad["category"] == "bad_test_acc" and "test accuracy 0.2 lies in (0, 0.3)" in bad["reason"]
    # the original prints a warning for both runs but drops only the bad-test one
    _, printed = original_of(exp, "ABU", records)
    assert printed == [("test", "ABU", 9)]
    _, printed = original_of(exp, "relu", records)
    assert printed == [("val", "relu", 4)]
    warning = [line for line in lines if line.startswith("warning: relu run 4")]
    mean = statistics.fmean(records[HIGH_VAL_RUN]["val_top1_hist"])
    assert warning == [f"warning: relu run 4: mean validation accuracy over the whole run is {mean:.6g}, "
                       "above 0.95 (kept: the original only warns)"]
    assert not any(line.startswith("warning:") and "relu run 4" not in line for line in lines)
    assert result["warnings"] == warning
    assert 4 in load_pickle(os.path.join(exp, "0_analysis", "performance_summary_relu.pkl"))["runs"]
    assert 0.2 not in load_pickle(os.path.join(exp, "0_analysis", "performance_summary_ABU.pkl"))["test_acc"]


def test_bad_run_rule_boundaries():
    record = {"test_top1": 0.3}
    assert results.bad_test_reason(record) is None                     # open interval: 0.3 stays
    assert results.bad_test_reason({"test_top1": 0.0}) is None         # 0 stays (the original's `test_t1 and`)
    assert "0.29999" in results.bad_test_reason({"test_top1": 0.29999})
    assert "below 0.3" in results.val_mean_warning("s", 1, {"val_mb_n_hist": [0, 1], "val_top1_hist": [0.3, 0.29998]})
    assert results.val_mean_warning("s", 1, {"val_mb_n_hist": [0, 1], "val_top1_hist": [0.3, 0.95]}) is None
    assert results.val_mean_warning("s", 1, {"val_mb_n_hist": [0, 1], "val_top1_hist": [0.2, 0.3]}) is not None
    assert results.val_mean_warning("s", 1, {"val_mb_n_hist": [], "val_top1_hist": []}) is None


def welch_reference(a, b):
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return 2 * stats.t.sf(abs(t), df)


def welch_interval_reference(a, b):
    """mean difference -+ t_{0.975, Welch-Satterthwaite df} * se, written out."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    diff = statistics.fmean(a) - statistics.fmean(b)
    return diff - half, diff + half


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
    exp, _, _, lines = analysed
    rows, header = read_csv(os.path.join(exp, "0_analysis", "significance.csv"))
    assert header == ["spec_name", "reference", "n", "n_reference", "mean_diff", "mean_diff_ci_low",
                      "mean_diff_ci_high", "welch_p", "mannwhitney_p", "welch_p_holm", "mannwhitney_p_holm",
                      "hedges_g", "n_pairs", "paired_t_p", "wilcoxon_p", "paired_t_p_holm", "wilcoxon_p_holm"]
    by_spec = {row["spec_name"]: row for row in rows}
    assert set(by_spec) == {"ABU", "tanh"}
    ref = [0.70, 0.72, 0.69, 0.71]
    abu = [0.74, 0.73, 0.76]                                       # the bad run's 0.2 is not among them
    row = by_spec["ABU"]
    assert int(row["n"]) == 3
    assert close(row["mean_diff"], statistics.fmean(abu) - statistics.fmean(ref))
    low, high = welch_interval_reference(abu, ref)
    assert math.isclose(float(row["mean_diff_ci_low"]), low, rel_tol=1e-9)
    assert math.isclose(float(row["mean_diff_ci_high"]), high, rel_tol=1e-9)
    scipy_ci = stats.ttest_ind(abu, ref, equal_var=False).confidence_interval(0.95)
    assert math.isclose(low, scipy_ci.low, rel_tol=1e-9) and math.isclose(high, scipy_ci.high, rel_tol=1e-9)
    assert math.isclose(float(row["welch_p"]), welch_reference(abu, ref), rel_tol=1e-9)
    assert math.isclose(float(row["welch_p"]), stats.ttest_ind(abu, ref, equal_var=False).pvalue, rel_tol=1e-12)
    assert math.isclose(float(row["mannwhitney_p"]), mannwhitney_exact(abu, ref), rel_tol=1e-12)
    assert math.isclose(float(row["hedges_g"]), hedges_reference(abu, ref), rel_tol=1e-12)
    # only ABU has p values (tanh has one run), so Holm over one test leaves them as they are
    assert close(row["welch_p_holm"], float(row["welch_p"]))
    assert close(row["mannwhitney_p_holm"], float(row["mannwhitney_p"]))
    # paired by run number: ABU runs 1, 2, 5 and relu runs 1-4 pair on runs 1 and 2
    assert int(row["n_pairs"]) == 2
    assert math.isclose(float(row["paired_t_p"]), paired_t_reference([0.74, 0.73], [0.70, 0.72]), rel_tol=1e-9)
    assert math.isclose(float(row["wilcoxon_p"]), wilcoxon_exact([0.74, 0.73], [0.70, 0.72]), rel_tol=1e-12)
    assert close(row["paired_t_p_holm"], float(row["paired_t_p"]))
    assert close(row["wilcoxon_p_holm"], float(row["wilcoxon_p"]))
    tanh = by_spec["tanh"]
    assert int(tanh["n"]) == 1 and int(tanh["n_pairs"]) == 1       # tanh run 3 pairs with relu run 3
    for name in ("welch_p", "mannwhitney_p", "welch_p_holm", "mannwhitney_p_holm", "hedges_g",
                 "mean_diff_ci_low", "mean_diff_ci_high", "paired_t_p", "wilcoxon_p", "paired_t_p_holm",
                 "wilcoxon_p_holm"):
        assert tanh[name] == "nan"
    assert close(tanh["mean_diff"], 0.60 - statistics.fmean(ref))
    assert any("fewer than 2" in line and "tanh" in line for line in lines)


def paired_t_reference(a, b):
    """Two-sided paired t-test by hand: t = mean(d) / (sd(d) / sqrt(n)), n - 1 degrees of freedom."""
    d = [x - y for x, y in zip(a, b)]
    t = statistics.fmean(d) / (statistics.stdev(d) / math.sqrt(len(d)))
    return 2 * stats.t.sf(abs(t), len(d) - 1)


def wilcoxon_exact(a, b):
    """Two-sided exact Wilcoxon signed-rank p by enumerating every sign pattern (no zero or tied |d|)."""
    d = [x - y for x, y in zip(a, b)]
    ranks = stats.rankdata(np.abs(d))
    w_plus = sum(r for r, x in zip(ranks, d) if x > 0)
    totals = [sum(r for r, sign in zip(ranks, signs) if sign) for signs in itertools.product((0, 1), repeat=len(d))]
    low = min(w_plus, ranks.sum() - w_plus)
    return min(1.0, 2 * sum(t <= low for t in totals) / len(totals))


def test_paired_tests_against_scipy_and_by_hand():
    rng = np.random.default_rng(3)
    ref = {run: 0.70 + 0.02 * rng.normal() for run in range(1, 13)}
    spec = {run: acc + 0.01 + 0.01 * rng.normal() for run, acc in ref.items() if run != 4}
    spec[20] = 0.9                                                     # no partner: not a pair
    result = run_statistics.compare_paired(spec, ref)
    runs = sorted(set(spec) & set(ref))
    a, b = [spec[r] for r in runs], [ref[r] for r in runs]
    assert result["n_pairs"] == 11
    assert math.isclose(result["paired_t_p"], stats.ttest_rel(a, b).pvalue, rel_tol=1e-12)
    assert math.isclose(result["paired_t_p"], paired_t_reference(a, b), rel_tol=1e-9)
    assert math.isclose(result["wilcoxon_p"], stats.wilcoxon(a, b).pvalue, rel_tol=1e-12)
    assert math.isclose(result["wilcoxon_p"], wilcoxon_exact(a, b), rel_tol=1e-12)
    # the pairing matters: the unpaired Welch p of the same numbers is far larger
    assert result["paired_t_p"] < 0.01 < stats.ttest_ind(a, b, equal_var=False).pvalue
    assert math.isnan(run_statistics.compare_paired({1: 0.5}, {1: 0.4})["paired_t_p"])              # one pair
    same = run_statistics.compare_paired({1: 0.5, 2: 0.6}, {1: 0.5, 2: 0.6})                      # every difference 0
    assert same["n_pairs"] == 2 and math.isnan(same["paired_t_p"]) and math.isnan(same["wilcoxon_p"])
    shifted = run_statistics.compare_paired({1: 0.6, 2: 0.7, 3: 0.8}, {1: 0.5, 2: 0.6, 3: 0.7})   # one constant shift
    assert math.isnan(shifted["paired_t_p"]) and shifted["wilcoxon_p"] == pytest.approx(0.25)


def test_welch_interval_by_hand():
    # a: mean 2, s^2 1, n 3; b: mean 0, s^2 4, n 5 -> se^2 = 1/3 + 4/5, df = se^4 / ((1/3)^2/2 + (4/5)^2/4)
    se2 = 1 / 3 + 4 / 5
    df = se2 ** 2 / ((1 / 3) ** 2 / 2 + (4 / 5) ** 2 / 4)
    half = stats.t.ppf(0.975, df) * math.sqrt(se2)
    low, high = run_statistics.welch_interval([1.0, 2.0, 3.0], [-2.0, -2.0, 0.0, 2.0, 2.0])
    assert math.isclose(low, 2 - half, rel_tol=1e-12) and math.isclose(high, 2 + half, rel_tol=1e-12)
    assert 5.0 < df < 6.0 and 2.4 < stats.t.ppf(0.975, df) < 2.6
    assert all(math.isnan(v) for v in run_statistics.welch_interval([1.0, 1.0], [2.0, 2.0]))   # no spread
    assert all(math.isnan(v) for v in run_statistics.welch_interval([1.0], [2.0, 3.0]))        # n < 2


def test_holm_against_hand_computed_examples():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06
    assert np.allclose(run_statistics.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    assert np.allclose(run_statistics.holm([0.6, 0.7]), [1.0, 1.0])                        # capped at 1
    adjusted = run_statistics.holm([math.nan, 0.5, 0.3])                                    # NaN not counted
    assert math.isnan(adjusted[0]) and np.allclose(adjusted[1:], [0.6, 0.6])
    assert np.allclose(run_statistics.holm([0.02, 0.02]), [0.04, 0.04])                     # ties
    assert np.allclose(run_statistics.holm([0.2]), [0.2])


def test_excluded_runs_are_named_with_reasons(analysed):
    exp, _, result, lines = analysed
    rows, _ = read_csv(os.path.join(exp, "0_analysis", "excluded_runs.csv"))
    by_run = {(row["spec_name"], row["run"]): row for row in rows}
    assert set(by_run) == {("ABU", "6"), ("ABU", "7"), ("ABU", "8"), ("ABU", "9"), ("selu", "1")}
    assert {key: row["category"] for key, row in by_run.items()} == {
        ("ABU", "6"): "diverged", ("ABU", "7"): "incomplete", ("ABU", "8"): "unreadable",
        ("ABU", "9"): "bad_test_acc", ("selu", "1"): "no_recorder"}
    assert "diverged at minibatch 33" in by_run["ABU", "6"]["reason"]
    assert "incomplete" in by_run["ABU", "7"]["reason"] and "40 of 100" in by_run["ABU", "7"]["reason"]
    assert "unreadable" in by_run["ABU", "8"]["reason"]
    assert by_run["selu", "1"]["reason"] == "no recorder file"
    for spec, run in by_run:
        assert sum(line.startswith(f"excluded: {spec} run {run}:") for line in lines) == 1
    assert len(result["excluded"]) == 5


def test_printed_summary_table_and_report_path_last(analysed):
    exp, _, result, lines = analysed
    table = next(line for line in lines if line.startswith("spec"))
    rows = {line.split()[0]: line for line in table.splitlines()[1:]}
    ref = [0.70, 0.72, 0.69, 0.71]
    assert f"{100 * statistics.fmean(ref):.2f} ± {100 * statistics.pstdev(ref):.2f}" in rows["relu"]
    assert "(reference)" in rows["relu"]
    assert f"{100 * (statistics.fmean([0.74, 0.73, 0.76]) - statistics.fmean(ref)):+.2f}" in rows["ABU"]
    assert lines[-3] == f"tables, plots and summaries: {os.path.join(exp, '0_analysis')}"
    assert lines[-2] == ("TensorBoard (curves, histograms, HParams): tensorboard --logdir "
                         f"{os.path.join(exp, '0_summaries')}")
    assert lines[-1] == f"report: {os.path.join(exp, '0_analysis', 'report.html')}"
    assert result["report"] == os.path.join(exp, "0_analysis", "report.html")


# ---------------------------------------------------------------- plots

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


def test_af_weights_of_the_tested_model(analysed):
    exp, records, _, _ = analysed
    x = figures.AF_X
    # ABU: recorder['test_af_weights'] (x1.5) wins over the history at the tested minibatch
    record = records["ABU", 5]
    entry = figures.tested_af_weights(exp, "ABU", 5, record)["dense5"]
    raw = blend_weights("5_blend5_swish", 5, 40) * 1.4 * TEST_AF_SCALE
    assert np.allclose(entry["blend_weights_raw"], raw)
    w = raw / raw.sum()
    beta = 1.25
    elu = np.where(x > 0, x, np.exp(np.minimum(x, 0)) - 1)
    expected = (w[0] * np.maximum(x, 0) + w[1] * elu + w[2] * np.tanh(x)
                + w[3] * x / (1 + np.exp(-beta * x)) + w[4] * x)
    assert np.allclose(figures.af_curves([record], [{"dense5": entry}], ["dense5"])["dense5"][0], expected)
    # old recorders: relu run 1's AF-weights file (x2); run 2's file is for another mb, so its history
    weights = [figures.tested_af_weights(exp, "relu", run, records["relu", run]) for run in (1, 2)]
    w1 = blend_weights("1_relu", 1, 60)[0] * 2.0 * 1.1
    w2 = blend_weights("1_relu", 2, 70)[0] * 1.1
    curves = figures.af_curves([records["relu", 1], records["relu", 2]], weights, ["conv2"])
    assert np.allclose(curves["conv2"], [w1 * np.maximum(x, 0), w2 * np.maximum(x, 0)])


def test_af_shapes_draw_the_plain_relu_dashed_in_every_panel():
    curves = {layer: np.array([np.tanh(figures.AF_X), 0.5 * np.tanh(figures.AF_X)]) for layer in ("conv1", "dense5")}
    fig = figures.af_shapes_figure("s", curves, 2)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["conv1", "dense5"]
    for ax in panels:
        relu = [line for line in ax.get_lines() if line.get_label() == "ReLU"]
        assert len(relu) == 1 and relu[0].get_linestyle() == "--"
        assert np.allclose(relu[0].get_xdata(), figures.AF_X)
        assert np.allclose(relu[0].get_ydata(), np.maximum(figures.AF_X, 0))


def test_curves_on_a_common_grid():
    grid, matrix = da.on_common_grid([([0, 10, 20], [0.1, 0.2, 0.3]), ([0, 20], [0.5, 0.7])])
    assert list(grid) == [0, 10, 20]
    mean, low, high = da.band(matrix)
    assert np.allclose(mean, [0.3, 0.2, 0.5]) and np.allclose(low, [0.1, 0.2, 0.3])
    assert np.allclose(high, [0.5, 0.2, 0.7])


def test_over_runs_of_unequal_length_ignores_the_gaps():
    result = da.over_runs([([1, 2, 3], [0.1, 0.5, 0.3]), ([1, 2], [0.2, 0.4])])
    assert result["run_max_list"] == [0.5, 0.4] and result["run_min_list"] == [0.1, 0.2]
    assert np.allclose(result["mean_run"], [0.15, 0.45, 0.3]) and np.allclose(result["std_run"], [0.05, 0.05, 0])


# ---------------------------------------------------------------- the report

class StrictHTML(html.parser.HTMLParser):
    """Checks nesting (every non-void tag closed, in order) and collects imgs and the comparison table."""
    VOID = {"meta", "img", "br", "hr", "link", "input", "col", "area", "base", "wbr", "source"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.images, self.table_rows = [], [], [], []
        self.in_table, self.row, self.cell = False, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag == "table" and attrs.get("id") == "comparison":
            self.in_table = True
        elif self.in_table and tag == "tr":
            self.row = {"class": attrs.get("class"), "cells": [], "header": False}
        elif self.in_table and tag in ("td", "th"):
            self.cell = []
            self.row["header"] = tag == "th"

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()
        if self.in_table and tag in ("td", "th"):
            self.row["cells"].append("".join(self.cell).strip())
            self.cell = None
        elif self.in_table and tag == "tr":
            self.table_rows.append(self.row)
        elif tag == "table":
            self.in_table = False

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def parse_report(path):
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    parser = StrictHTML()
    parser.feed(text)
    parser.close()
    return text, parser


def pct(x):
    return "—" if math.isnan(x) else f"{100 * x:.2f}"


def pp(x):
    return "—" if math.isnan(x) else f"{100 * x:+.2f}"


def pvalue(p):
    return "—" if math.isnan(p) else (f"{p:.2g}" if p < 0.001 else f"{p:.3f}")


def test_report_is_well_formed_and_self_contained(analysed):
    exp = analysed[0]
    text, parser = parse_report(os.path.join(exp, "0_analysis", "report.html"))
    assert text.startswith("<!DOCTYPE html>")
    assert parser.errors == [] and parser.stack == []
    assert not re.search(r"""(src|href)=["'](https?:|//)""", text)          # nothing fetched from a network
    assert "<link" not in text and "<script" not in text


def test_report_images_are_pngs(analysed):
    import matplotlib.image
    exp = analysed[0]
    _, parser = parse_report(os.path.join(exp, "0_analysis", "report.html"))
    # PA + relu and ABU 4 plots each + tanh all_runs and preactivation_stats (its af/blend plots are missing)
    assert len(parser.images) == 1 + 4 + 4 + 2
    for attrs in parser.images:
        prefix = "data:image/png;base64,"
        assert attrs["src"].startswith(prefix) and attrs.get("alt")
        data = base64.b64decode(attrs["src"][len(prefix):], validate=True)
        assert data[:8] == PNG_MAGIC
        assert matplotlib.image.imread(io.BytesIO(data), format="png").ndim == 3
    with open(os.path.join(exp, "0_analysis", "af_shapes_ABU.png"), "rb") as handle:
        embedded = base64.b64encode(handle.read()).decode()
    assert any(attrs["src"].endswith(embedded) for attrs in parser.images)


def test_report_table_equals_the_csvs(analysed):
    exp = analysed[0]
    folder = os.path.join(exp, "0_analysis")
    _, parser = parse_report(os.path.join(folder, "report.html"))
    header, *rows = parser.table_rows
    assert header["header"]
    names = header["cells"]
    performance = {row["spec_name"]: row for row in read_csv(os.path.join(folder, "main_performance_analysis.csv"))[0]}
    significance = {row["spec_name"]: row for row in read_csv(os.path.join(folder, "significance.csv"))[0]}
    excluded = read_csv(os.path.join(folder, "excluded_runs.csv"))[0]
    cells = [dict(zip(names, row["cells"])) for row in rows]
    assert [c["spec"] for c in cells] == ["ABU", "relu", "tanh", "selu"]
    for c in cells:
        spec = c["spec"]
        gone = [row for row in excluded if row["spec_name"] == spec]
        assert c["excluded"] == str(sum(row["category"] != "diverged" for row in gone))
        tested = int(spec == DIVERGED_RUN[0])                          # relu run 3 diverged and was tested
        assert c["diverged"] == str(sum(row["category"] == "diverged" for row in gone) + tested)
        if spec not in performance:
            assert c["runs analysed"] == "0" and c["test acc [%] mean ± std"] == "—"
            continue
        perf = performance[spec]
        assert c["runs analysed"] == perf["n_runs"]
        mean, std = c["test acc [%] mean ± std"].split(" ± ")
        assert mean == pct(float(perf["test acc [mean]"])) and std == pct(float(perf["test acc [std]"]))
        assert c["test acc [%] median"] == pct(float(perf["test acc [median]"]))
        if spec == "relu":
            continue
        sig = significance[spec]
        assert c["Δ to reference [pp]"] == pp(float(sig["mean_diff"]))
        if sig["mean_diff_ci_low"] == "nan":
            assert c["95 % CI of Δ [pp]"] == "—"
        else:
            assert c["95 % CI of Δ [pp]"] == f"[{pp(float(sig['mean_diff_ci_low']))}, " \
                                             f"{pp(float(sig['mean_diff_ci_high']))}]"
        assert c["pairs"] == sig["n_pairs"]
        for column, key in (("paired t p", "paired_t_p"), ("paired t p (Holm)", "paired_t_p_holm"),
                            ("Wilcoxon p", "wilcoxon_p"), ("Wilcoxon p (Holm)", "wilcoxon_p_holm"),
                            ("Welch p", "welch_p"), ("Welch p (Holm)", "welch_p_holm"),
                            ("Mann–Whitney p", "mannwhitney_p"), ("Mann–Whitney p (Holm)", "mannwhitney_p_holm")):
            assert c[column] == pvalue(float(sig[key])), column
        g = float(sig["hedges_g"])
        assert c["Hedges' g"] == ("—" if math.isnan(g) else f"{g:+.2f}")
    assert {c["spec"]: c["excluded"] for c in cells}["ABU"] == "3" and cells[0]["diverged"] == "1"
    assert "[" in cells[0]["95 % CI of Δ [pp]"]                     # ABU has an interval


def test_diverged_runs_are_analysed_and_flagged_in_the_report(analysed):
    exp, _, result, _ = analysed
    assert result["diverged"] == [{"spec_name": "relu", "run": 3, "diverged_at_mb": 85, "early_stopping_mb": 80}]
    text, _ = parse_report(os.path.join(exp, "0_analysis", "report.html"))
    assert "<li>relu run 3: diverged at mb 85; tested from mb 80 and counted</li>" in text
    assert "The paired tests lead: run k of every spec shares its seed" in text


def test_without_a_validation_set_the_val_columns_are_empty(tmp_path):
    """Runs with -create_val_set False validated on the test set (monitoring): no val column may show it."""
    exp = str(tmp_path / "3_output_cifar" / "noval")
    for run, acc in ((1, 0.60), (2, 0.62)):
        record = fake_record("relu", run, acc, N_MB, "1_relu", "unrestricted")
        record["settings"]["create_val_set"] = False
        write_record(exp, record)
    da.analyse_experiment(exp, reference="relu", out=lambda line: None)
    (row,), header = read_csv(os.path.join(exp, "0_analysis", "main_performance_analysis.csv"))
    val_columns = [name for name in header if name.startswith("val acc")]
    assert len(val_columns) == 12 and all(row[name] == "" for name in val_columns)
    assert close(row["test acc [mean]"], 0.61) and row["train acc at e.s. mb [mean]"] not in ("", "nan")
    summary = load_pickle(os.path.join(exp, "0_analysis", "performance_summary_relu.pkl"))
    assert len(summary["v_mb"]) == 0 and all(math.isnan(v) for v in summary["val_acc"])


def test_report_marks_the_reference_and_sorts_by_mean_test_acc(analysed):
    exp = analysed[0]
    _, parser = parse_report(os.path.join(exp, "0_analysis", "report.html"))
    header, *rows = parser.table_rows
    marked = [row for row in rows if row["class"] == "reference"]
    assert len(marked) == 1 and marked[0]["cells"][0] == "relu"
    assert marked[0]["cells"][header["cells"].index("Δ to reference [pp]")] == "reference"
    means = [float(row["cells"][4].split(" ± ")[0]) for row in rows if row["cells"][4] != "—"]
    assert means == sorted(means, reverse=True) and len(means) == 3


def test_report_says_what_produced_it(analysed):
    exp = analysed[0]
    text, _ = parse_report(os.path.join(exp, "0_analysis", "report.html"))
    produced = text[text.index("What produced this report"):]
    assert "af_set" in produced[:produced.index("Settings common")]            # differs between specs
    common = produced[produced.index("Settings common"):]
    assert "<td>n_minibatches</td><td>100</td>" in common and "<td>dropout_keep_probs</td><td>0.5</td>" in common
    assert "Vary between the runs of a spec: run, seed." in produced
    for name, md5 in RAW_MD5.items():
        assert f"<td>md5 of raw {name}</td><td>{md5}</td>" in produced
    assert "cifar10_trainset.json" in produced and "cifar10_testset.json" in produced
    suite = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    head = subprocess.run(["git", "-C", suite, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    if head.returncode == 0:
        dirty = subprocess.run(["git", "-C", suite, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        state = "uncommitted changes in the working tree" if dirty else "clean working tree"
        assert f"<td>{head.stdout.strip()} ({state})</td>" in produced
    import numpy
    assert f"<td>numpy</td><td>{numpy.__version__}</td>" in produced
    assert re.search(r"<td>date</td><td>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", produced)


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
    text, parser = parse_report(result["report"])
    assert parser.errors == [] and "No significance tests" in text
    assert "No preprocessing sidecar found" in text                              # no 1_data_cifar10 anywhere


def test_only_bad_runs_is_a_finding_not_an_error(tmp_path):
    exp = str(tmp_path / "exp")
    write_record(exp, fake_record("relu", 1, 0.1, 50, "1_relu", "unrestricted"))
    write_record(exp, fake_record("relu", 2, 0.25, 60, "1_relu", "unrestricted"))
    lines = []
    result = da.analyse_experiment(exp, reference="relu", out=lines.append)
    assert result["performance"] == [] and result["significance"] is None
    rows, header = read_csv(os.path.join(exp, "0_analysis", "main_performance_analysis.csv"))
    assert rows == [] and header[0] == "spec_name"
    excluded, _ = read_csv(os.path.join(exp, "0_analysis", "excluded_runs.csv"))
    assert [(row["run"], row["category"]) for row in excluded] == [("1", "bad_test_acc"), ("2", "bad_test_acc")]
    assert any(line.startswith("every complete run was excluded as a bad run") for line in lines)
    _, parser = parse_report(result["report"])
    assert parser.errors == [] and len(parser.images) == 0
    assert [row["cells"][:4] for row in parser.table_rows[1:]] == [["relu", "0", "2", "0"]]
    assert lines[-1] == f"report: {result['report']}"


def test_report_says_what_the_runs_activations_ran_on(tmp_path):
    exp = str(tmp_path / "exp")
    build = "g++ (Debian 12.2.0) 12.2.0, -march=native -mno-avx512fp16"
    plain = "plain: compiling deepnet_abu_op.cc failed: no C++ compiler: 'g++' cannot be run"
    for spec, run, kernel in (("relu", 1, "fused"), ("relu", 2, "fused"), ("ABU", 1, "fused"), ("ABU", 2, plain)):
        write_record(exp, fake_record(spec, run, 0.5 + 0.01 * run, 50, "1_relu" if spec == "relu" else
                                      "5_blend5_swish", "unrestricted", activation_kernel=kernel,
                                      activation_kernel_build=build if kernel == "fused" else ""))
    write_record(exp, fake_record("tanh", 1, 0.5, 50, "1_tanh", "unrestricted"))    # an older run: no such key
    result = da.analyse_experiment(exp, out=lambda line: None)
    text, parser = parse_report(result["report"])
    assert parser.errors == []
    section = text[text.index('id="activation-kernel"'):]
    section = section[:section.index("</table>")]
    rows = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td><td>(.*?)</td></tr>", section)
    assert sorted(rows) == sorted([(f"fused ({build})", "3", "ABU, relu"), (plain.replace("'", "&#x27;"), "1", "ABU"),
                                   ("not recorded (older run)", "1", "tanh")])
    assert "Some runs used the plain composition" in text


def test_the_analysis_imports_no_tensorflow(tmp_path):
    """The whole analysis, the HParams config included, runs without TensorFlow (which takes seconds to import)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_analysis as t, deepnet_analysis as da; "
            "exp = sys.argv[2]; t.build_experiment(exp); result = da.analyse_experiment(exp, out=lambda line: None); "
            "print(result['report']); print('tensorflow' in sys.modules)")
    exp = str(tmp_path / "3_output_cifar" / "exp")
    result = subprocess.run([sys.executable, "-c", code, tests, exp], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == [os.path.join(exp, "0_analysis", "report.html"), "False"]
    assert len(glob.glob(os.path.join(exp, "0_summaries", "*.hparams_config"))) == 1
