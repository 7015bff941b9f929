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

import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from deepnet import outputs, run_folder  # noqa: E402
from conftest import run_settings
from deepnet_util import load_pickle
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
