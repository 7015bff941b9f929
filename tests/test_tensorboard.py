"""TensorBoard: the runs' event files read with TensorBoard's own reader, and a real TensorBoard server
answering for a tiny experiment through its HTTP data API (scalars and the HParams dashboard)."""
import glob
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from deepnet import histograms, outputs, run_folder, trainer  # noqa: E402
from conftest import run_settings
from deepnet_util import RunError, load_pickle
import deepnet_analysis
import deepnet_task_cifar as task

SPECS = {"relu": {}, "ABU": {"af_set": "5_blend5_swish", "blend_trainable": True, "swish_beta_trainable": True}}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """Two specs, one run each; ABU stops for the walltime twice and resumes."""
    from conftest import write_tiny_data
    root = write_tiny_data(str(tmp_path_factory.mktemp("tb")))
    settings = {}
    for spec, overrides in SPECS.items():
        s = run_settings(root, spec_name=spec, n_minibatches=40, walltime=1e-4 if spec == "ABU" else 0, **overrides)
        sessions = 0
        while not os.path.exists(run_folder.run_paths(s)["record"]) or not load_pickle(run_folder.run_paths(s)["record"])[
                "test_completed"]:
            assert task.run_training(s, out=lambda line: None) == 0
            sessions += 1
        assert sessions == (3 if spec == "ABU" else 1)
        settings[spec] = s
    deepnet_analysis.analyse_experiment(run_folder.experiment_dir(settings["relu"]), out=lambda line: None)
    config = [hparams_data(e).experiment for e in events(os.path.join(run_folder.experiment_dir(settings["relu"]),
                                                                     "0_summaries")) if hparams_data(e)]
    return root, settings, [info.name for info in config[0].hparam_infos]


def events(folder):
    for path in sorted(glob.glob(os.path.join(folder, "events.*"))):
        yield from EventFileLoader(path).Load()


def hparams_data(event):
    for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == hparams_metadata.PLUGIN_NAME:
            return plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    return None


def test_each_run_logs_its_hparams_once_and_its_metrics(experiment):
    root, settings, _ = experiment
    for spec, s in settings.items():
        record = load_pickle(run_folder.run_paths(s)["record"])
        starts, metrics = [], {}
        for event in events(run_folder.run_paths(s)["summaries"]):
            data = hparams_data(event)
            if data is not None and data.HasField("session_start_info"):
                starts.append(data.session_start_info)
            for value in event.summary.value:
                if value.tag.startswith("hparams/"):  # the loader migrates simple_value scalars to tensors
                    metrics.setdefault(value.tag, []).append(tensor_util.make_ndarray(value.tensor).item())
        assert len(starts) == 1, f"{spec}: {len(starts)} session starts"
        hparams = starts[0].hparams
        assert hparams["af_set"].string_value == s["af_set"] and hparams["spec_name"].string_value == spec
        assert hparams["lr"].number_value == s["lr"] and hparams["blend_trainable"].bool_value == s["blend_trainable"]
        assert "path_relative" not in hparams and "walltime" not in hparams
        assert metrics == {"hparams/test_top1": [pytest.approx(record["test_top1"])],
                           "hparams/test_top5": [pytest.approx(record["test_top5"])],
                           "hparams/best_val_top1": [pytest.approx(max(record["val_top1_hist"]))],
                           "hparams/early_stopping_mb": [record["early_stopping_mb"]]}


def test_experiment_config_names_differing_and_standard_settings(experiment):
    root, settings, shown = experiment
    folder = os.path.join(run_folder.experiment_dir(settings["relu"]), "0_summaries")
    configs = [hparams_data(e).experiment for e in events(folder) if hparams_data(e) is not None]
    assert len(configs) == 1
    names = [info.name for info in configs[0].hparam_infos]
    assert names == shown and names[0] == "spec_name"  # written by the analysis
    assert {"af_set", "blend_trainable", "swish_beta_trainable", "walltime"} - set(names) == {"walltime"}
    assert set(outputs.ALWAYS_SHOWN_HPARAMS) <= set(names) and "n_minibatches" not in names  # same for both specs
    assert [m.name.tag for m in configs[0].metric_infos] == list(outputs.HPARAM_METRICS)
    assert outputs.write_hparams_config(run_folder.experiment_dir(settings["relu"]), settings) == shown  # again: replaces
    assert len(glob.glob(os.path.join(folder, f"*{outputs.HPARAMS_CONFIG_SUFFIX}"))) == 1


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fetch(url, body=None, timeout=10):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read().decode())


def test_tensorboard_serves_runs_scalars_and_hparams(experiment):
    root, settings, shown = experiment
    logdir = os.path.join(run_folder.experiment_dir(settings["relu"]), "0_summaries")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--host", "127.0.0.1",
                               "--port", str(port), "--reload_interval", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    base = f"http://127.0.0.1:{port}/data"
    try:
        runs, deadline = [], time.time() + 120
        while time.time() < deadline and not {"relu_1", "ABU_1"} <= set(runs):
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            try:
                runs = fetch(f"{base}/runs", timeout=5)
            except OSError:
                pass
            time.sleep(1)
        assert {"relu_1", "ABU_1"} <= set(runs)
        tags = fetch(f"{base}/plugin/scalars/tags")
        for run in ("relu_1", "ABU_1"):
            assert {"validation/top1", "objective/loss", "hparams/test_top1"} <= set(tags[run])
        assert "smcnLin/conv1/blend_weights/mean" in tags["ABU_1"]
        experiment_info = fetch(f"{base}/plugin/hparams/experiment", {"experimentName": ""})
        assert sorted(info["name"] for info in experiment_info["hparamInfos"]) == sorted(shown)
        assert {m["name"]["tag"] for m in experiment_info["metricInfos"]} == set(outputs.HPARAM_METRICS)
        groups = fetch(f"{base}/plugin/hparams/session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 100, "allowedStatuses": [
                "STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
            "colParams": [{"hparam": name} for name in shown] +
                         [{"metric": {"tag": tag}} for tag in outputs.HPARAM_METRICS]})["sessionGroups"]
        assert len(groups) == 2
        for group in groups:
            spec = group["hparams"]["spec_name"]
            record = load_pickle(run_folder.run_paths(settings[spec])["record"])
            values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
            assert values["hparams/test_top1"] == pytest.approx(record["test_top1"])
            assert values["hparams/early_stopping_mb"] == record["early_stopping_mb"]
            assert group["hparams"]["af_set"] == settings[spec]["af_set"]
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait()


# ---------------------------------------------------------------- histograms, made off the training step

def tensorflow_histogram(values):
    """The HistogramProto of TensorFlow's own HistogramSummary op for values."""
    tf = trainer.tf
    with tf.Graph().as_default(), tf.Session() as sess:
        serialized = sess.run(tf.raw_ops.HistogramSummary(tag="h", values=tf.constant(values)))
    return tf.Summary.FromString(serialized).value[0].histo


def histogram_inputs():
    rng = np.random.default_rng(3)
    limits = histograms.LIMITS[1:-1]
    yield "normal", (rng.normal(size=200_000) * 0.3).astype(np.float32)
    yield "activations", np.maximum(rng.normal(size=(32, 8, 8, 16)), 0).astype(np.float32)
    yield "on the limits", np.concatenate([limits, np.nextafter(limits, np.inf), np.nextafter(limits, -np.inf)])
    yield "wide", (np.sign(rng.normal(size=5000)) * 10.0 ** rng.uniform(-45, 38, size=5000)).astype(np.float32)
    yield "extremes", np.array([0.0, -0.0, 5e-324, -5e-324, 1.7e307, -1.7e307, 1e20, 1e-12, 1e200])
    yield "one value", np.array([0.25], np.float32)
    yield "integers", rng.integers(-3, 4, size=1000).astype(np.int32)


@pytest.mark.parametrize("name,values", list(histogram_inputs()), ids=[name for name, _ in histogram_inputs()])
def test_histograms_are_those_of_tensorflows_op(name, values):
    ours, theirs = histograms.histogram(values), tensorflow_histogram(values)
    assert ours["bucket_limit"] == list(theirs.bucket_limit) and ours["bucket"] == list(theirs.bucket)
    assert (ours["min"], ours["max"], ours["num"]) == (theirs.min, theirs.max, theirs.num)
    # sums in another order: equal to rounding, relative to the sum of the magnitudes (the op adds in order)
    magnitude = np.sum(np.abs(values.astype(np.float64)))
    assert abs(ours["sum"] - theirs.sum) <= 1e-12 * magnitude
    assert ours["sum_squares"] == pytest.approx(theirs.sum_squares, rel=1e-12)


def test_the_summary_writer_makes_histograms_off_the_step_and_skips_non_finite_ones(tmp_path, monkeypatch):
    tf = trainer.tf
    folder = str(tmp_path / "summaries")
    writer = trainer.SummaryWriter(folder)
    finite, broken = np.linspace(-2, 3, 1001, dtype=np.float32), np.array([1.0, np.nan, 2.0], np.float32)
    writer.add_histograms({"a/histogram": finite, "b/histogram": broken, "c/histogram": -finite}, 20)
    assert writer._histograms.name == "histograms"  # made in a thread of its own
    writer.add_histograms({"a/histogram": 2 * finite}, 40)  # waits for the step-20 ones first
    writer.close()
    assert writer._histograms is None
    written = {(event.step, value.tag): value.histo for path in glob.glob(os.path.join(folder, "events.*"))
               for event in tf.train.summary_iterator(path) for value in event.summary.value}
    assert sorted(written) == [(20, "a/histogram"), (20, "c/histogram"), (40, "a/histogram")]
    for (step, tag), array in {(20, "a/histogram"): finite, (20, "c/histogram"): -finite,
                               (40, "a/histogram"): 2 * finite}.items():
        assert written[step, tag] == tf.HistogramProto(**histograms.histogram(array))
    # a failure in the histogram thread is raised at the writer's next call: a full disk as one line, the rest as is
    writer = trainer.SummaryWriter(folder)
    monkeypatch.setattr(histograms, "histogram", lambda values: (_ for _ in ()).throw(MemoryError("no memory")))
    writer.add_histograms({"a/histogram": finite}, 60)
    with pytest.raises(MemoryError, match="no memory"):
        writer.flush()
    failure = RuntimeError("/s/events; No space left on device")
    monkeypatch.setattr(histograms, "histogram", lambda values: (_ for _ in ()).throw(failure))
    writer.add_histograms({"a/histogram": finite}, 80)
    with pytest.raises(RunError) as stop:
        writer.close()
    assert str(stop.value) == (f"{folder}: TensorBoard summaries not written (/s/events; No space left on device); "
                               "the checkpoints written before are intact: fix the cause and run the same command "
                               "again to resume")
