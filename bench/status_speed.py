"""How long `deepnet_supervisor.py --status` takes for the paper sweep: 17 specs x 30 runs of 60,000 minibatches.

    python bench/status_speed.py              # prints status_seconds=<s> (target: under 2 s)
    python bench/status_speed.py --compare    # also times loading every recorder, what --status avoids

Builds the 510 run folders in a temporary folder: 15 runs per spec complete, 2 running (this process holds
their locks), 3 incomplete, 1 diverged (and tested: complete), 9 not started. Each started run has its
status.json and a recorder of realistic size (60,000 entries in each training history, one validation every
20 minibatches); the recorders are hard links to one file, so the folders take little disk while every run
still has its own full-size recorder to read. Then times the real command line as a child process (start-up
and imports included) and checks that it reported every run.
"""
import argparse
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from deepnet import commands  # noqa: E402
import deepnet_supervisor as sv  # noqa: E402
from deepnet_util import RunLock, load_pickle  # noqa: E402

N_MINIBATCHES = 60000
VAL_EVERY = 20
LAYERS = ("conv1", "conv2", "conv3", "conv4", "dense5", "dense6")


def realistic_recorder():
    """A recorder with full-length histories (60,000 training entries, 3,001 validations)."""
    rng = random.Random(0)
    val_mbs = list(range(0, N_MINIBATCHES + 1, VAL_EVERY))
    return {
        "spec_name": "relu", "run": 1, "settings": {"n_minibatches": N_MINIBATCHES},
        "mb_count_total": N_MINIBATCHES, "checkpoints": list(range(0, N_MINIBATCHES + 1, 1560)),
        "train_mb_n_hist": list(range(1, N_MINIBATCHES + 1)),
        "train_loss_hist": [rng.random() for _ in range(N_MINIBATCHES)],
        "train_top1_hist": [rng.random() for _ in range(N_MINIBATCHES)],
        "val_mb_n_hist": val_mbs,
        "val_loss_hist": [rng.random() for _ in val_mbs],
        "val_top1_hist": [rng.random() for _ in val_mbs],
        "val_top5_hist": [rng.random() for _ in val_mbs],
        "val_af_weights_hist": [{layer: {"blend_weights_raw": [1.0], "blend_weights": [1.0], "swish_beta": None}
                                 for layer in LAYERS} for _ in val_mbs],
        "test_completed": True, "diverged": False, "test_top1": 0.78,
    }


def status_of(index):
    """status.json of the index-th run of a spec (1-based), or None for a run not started."""
    if index > 21:
        return None
    status = {"pid": 1000 + index, "host": "node1", "n_minibatches": N_MINIBATCHES, "test_top1": None,
              "updated": time.time(), "message": ""}
    if index <= 15:
        return dict(status, state="complete", mb=N_MINIBATCHES, val_top1=0.79, test_top1=0.78,
                    last_checkpoint_mb=N_MINIBATCHES, train_seconds=3600.0 + index)
    if index <= 17:
        return dict(status, state="running", mb=20000, val_top1=0.7, last_checkpoint_mb=18720,
                    train_seconds=1200.0)
    if index <= 20:
        return dict(status, state="incomplete", mb=30000, val_top1=0.72, last_checkpoint_mb=29640,
                    train_seconds=1800.0, message="walltime reached")
    return dict(status, state="complete", mb=122, val_top1=0.0, test_top1=0.35, last_checkpoint_mb=0,
                diverged_at_mb=123, train_seconds=8.0, message="complete; diverged at mb 123")


def build(root):
    """The paper sweep's run folders under root; returns the locks held for the running runs."""
    recorder = os.path.join(root, "recorder.pkl")
    with open(recorder, "wb") as handle:
        pickle.dump(realistic_recorder(), handle, protocol=4)
    experiment = sv.SWEEPS["paper"]["experiment"]
    locks = []
    for spec in sv.SWEEPS["paper"]["specs"]:
        for run in sv.parse_runs(sv.SWEEPS["paper"]["runs"]):
            status = status_of(run)
            if status is None:
                continue
            settings = sv.run_settings(sv.SETTINGS, {}, {"path_relative": root}, experiment, spec, run)
            os.makedirs(commands.run_paths(settings)['run_dir'])
            with open(commands.run_paths(settings)['status'], "w") as handle:
                json.dump(status, handle)
            try:
                os.link(recorder, commands.run_paths(settings)['record'])
            except OSError:
                shutil.copyfile(recorder, commands.run_paths(settings)['record'])
            if status["state"] == "running":
                locks.append(RunLock(commands.run_paths(settings)['lock']))
                locks[-1].acquire()
    return locks, os.path.getsize(recorder)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compare", action="store_true", help="also time loading every recorder")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_status_") as root:
        locks, recorder_bytes = build(root)
        command = [sys.executable, os.path.join(REPO, "deepnet_supervisor.py"), "--status", "--sweep", "paper",
                   "--workers", "4", "--set", f"path_relative={root}"]
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - start
        summary = result.stdout.splitlines()[-2:]
        assert summary[0] == ("510 runs: 272 complete (17 diverged), 34 running, 51 incomplete, 0 failed, "
                              "153 not started"), summary[0]
        print(f"recorder size {recorder_bytes / 1e6:.1f} MB; {summary[0]}")
        print(summary[1])
        if args.compare:
            paths = [commands.run_paths(settings)["record"] for settings in sv.plan(sv.parse_args(
                ["--sweep", "paper", "--set", f"path_relative={root}"])) if status_of(settings["run"])]
            start = time.perf_counter()
            for path in paths:
                load_pickle(path)
            print(f"recorders_seconds={time.perf_counter() - start:.2f} (loading the {len(paths)} recorders alone)")
        for lock in locks:
            lock.handle.close()
    print(f"status_seconds={seconds:.2f}")


if __name__ == "__main__":
    main()
