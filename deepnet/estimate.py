"""The --dry-run estimate: a few training steps of each network and activation kind, timed in a child process
(python -m deepnet.estimate) so that TensorFlow stays out of the supervisor, and the sweep's wall time from them.
"""
import json
import os
import subprocess
import sys
import time

from deepnet import commands, data, datasets, run_folder, schedule, status
from deepnet_util import clock


ESTIMATE_BUDGET_S = 60          # --dry-run times training steps for at most about this long in all
ESTIMATE_STEPS = 5              # timed training steps per network and activation kind (after an untimed one)
CIFAR_IMAGES = (50000, 10000)   # training and test images of CIFAR-10 and CIFAR-100


def timing_key(settings):
    """What sets a run's step time: network, classes and whether its activation blends several functions."""
    blend = int(settings["af_set"].split("_", 1)[0]) > 1
    return settings["network"], settings["task"], "blend" if blend else "1 function"


def time_steps(settings, threads, deadline, steps=ESTIMATE_STEPS, timer=time.perf_counter):
    """(seconds per training step, seconds per inference image) of the run's graph (step_timing), timed in a child
    process so that TensorFlow stays out of the supervisor; until timer() passes deadline (at least one step)."""
    request = {"settings": settings, "threads": threads, "seconds": max(deadline - timer(), 0.0), "steps": steps}
    result = subprocess.run([sys.executable, "-m", "deepnet.estimate"], input=json.dumps(request), text=True,
                            capture_output=True, cwd=commands.REPO_DIR)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        why = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise RuntimeError(f"timing the training steps of {' '.join(timing_key(settings))} failed: {why}")
    step_s, image_s = json.loads(lines[-1])
    return step_s, image_s


def step_timing(settings, threads, deadline, steps=ESTIMATE_STEPS, timer=time.perf_counter):
    """(seconds per training step, seconds per inference image) of the run's graph on random images, with
    `threads` threads: `steps` timed steps, or fewer (at least one) once timer() passes deadline. Imports
    TensorFlow: time_steps runs it in a child process."""
    import numpy as np
    import deepnet_network as net
    tf, size, n_classes = net.tf, settings["minibatch_size"], datasets.N_CLASSES[settings["task"]]
    graph = tf.Graph()
    with graph.as_default():
        seed = settings["run"] if settings["seed"] is None else settings["seed"]
        model = net.build_model(dict(settings, n_classes=n_classes, seed=seed))
        init = tf.global_variables_initializer()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(size, 32, 32, 3)).astype(np.float32)
    feed = {model.inputs.images: images, model.inputs.labels: rng.integers(0, n_classes, size)}
    train = {**feed, model.inputs.keep_probs: settings["dropout_keep_probs"], model.inputs.training: True,
             model.inputs.step: 1, model.inputs.lr: settings["lr"]}
    infer = {**feed, model.inputs.keep_probs: settings["dropout_keep_probs_inference"]}
    config = tf.ConfigProto(intra_op_parallelism_threads=threads, inter_op_parallelism_threads=2)
    with tf.Session(graph=graph, config=config) as sess:
        sess.run(init)
        sess.run(model.train_op, train)  # the first runs of a graph pay for its set-up: untimed
        sess.run(model.top1, infer)
        seconds = []
        while not seconds or (len(seconds) < steps and timer() < deadline):
            began = timer()
            sess.run(model.train_op, train)
            seconds.append(timer() - began)
        began = timer()
        sess.run(model.top1, infer)
        inference = timer() - began
    return float(np.median(seconds)), inference / size


def measure(todo, workers, budget_s=ESTIMATE_BUDGET_S, timer=time.perf_counter):
    """{timing_key: (step s, inference s per image)} for the runs, each timed with a worker's share of the cores,
    within about budget_s in all."""
    groups = {}
    for settings in todo:
        groups.setdefault(timing_key(settings), settings)
    threads = max(1, (os.cpu_count() or 1) // workers)
    timings, began = {}, timer()
    for i, (key, settings) in enumerate(groups.items()):
        deadline = began + budget_s * (i + 1) / len(groups)
        timings[key] = time_steps(settings, threads, deadline, timer=timer)
    return timings


def minibatches_left(settings):
    """Minibatches a run still has to train: all, less those up to its newest checkpoint."""
    status = run_folder.read_status(commands.run_paths(settings)) or {}
    return settings["n_minibatches"] - min(status.get("last_checkpoint_mb") or 0, settings["n_minibatches"])


def run_seconds(settings, step_s, image_s, left):
    """Expected seconds of a run with `left` minibatches to go: its steps, its validations still to come (the
    validation split of CIFAR's 50,000 training images, or the test set without one) and its test."""
    n_train, n_test = CIFAR_IMAGES
    val_images = data.validation_size(n_train, settings["val_set_fraction"], settings["minibatch_size"]) \
        if settings["create_val_set"] else n_test
    done = settings["n_minibatches"] - left
    n_validations = sum(mb > done for mb in schedule.validation_mbs(settings)) + (done == 0)
    return left * step_s + (n_validations * val_images + n_test) * image_s


def estimate_line(todo, timings, workers):
    """The dry run's last line: runs, minibatches in all and the wall time with `workers` workers."""
    left = [minibatches_left(settings) for settings in todo]
    seconds = [run_seconds(settings, *timings[timing_key(settings)], mbs) for settings, mbs in zip(todo, left)]
    per_step = ", ".join(f"{network} {task} {kind} {1000 * step:.0f} ms" for (network, task, kind), (step, _)
                         in timings.items())
    return (f"{len(todo)} runs, {sum(left):,} minibatches in all; estimated wall time "
            f"{clock(status.finish_time([], seconds, workers))} with --workers {workers} on this machine "
            f"(per training step: {per_step or 'nothing timed'})")


def _timing_child():
    """python -m deepnet.estimate: time_steps's child; reads its request (JSON) on stdin, prints [step_s, image_s]."""
    request = json.load(sys.stdin)
    deadline = time.perf_counter() + request["seconds"]
    print(json.dumps(step_timing(request["settings"], request["threads"], deadline, request["steps"])))


if __name__ == "__main__":
    _timing_child()
