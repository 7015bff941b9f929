"""Training-step throughput of the activation functions on smcn, side by side in one process.

    python bench/train_throughput.py            # default run, a few minutes on 2 cores
    python bench/train_throughput.py --quick    # a short run (fewer steps)
    python bench/train_throughput.py --kernels-only   # the activation ops alone, GB/s
    python bench/train_throughput.py --quick --loop-images 5120   # a smoke run of every figure

Every graph is built by the suite's own deepnet_network.build_model (minibatch 256, CIFAR-shaped
random data, keep_probs [0.5], training True, Adam, weight decay) in its own session with the
suite's default session config. After a warm-up the configurations take turns (in an order rotated
every round), --reps rounds of --steps train_op runs (and as many eval passes) each, so machine load
hits them alike; the table's figures are medians over all steps, the ratios on the lines below it (and on
the last line) medians over the rounds of the two configurations' ratio in the same round.
The eval pass is sess.run of the loss and top-1 with training False and no dropout.
Peak RSS is that of a child process that builds only this configuration and runs a few steps
(VmHWM; it includes TensorFlow itself), since one process holding all graphs cannot tell them apart.

"plain (before)" rows force the plain composition of TF ops (deepnet_network.FUSED_ABU = False);
the others use the fused kernels of deepnet_abu_op.cc, as training does. "x relu" is relative to
the fused fixed 1_relu, the fastest exact ReLU.

It starts with the activation ops alone (--kernels-only: only that): GB/s of activations forward
and backward of TF's relu, the fused scaled relu and the fused ABU on smcn's largest activation.
The training loop's figures run the suite's own loop (Trainer._train with its input pipeline,
deepnet/pipeline.py) with the fused 5_blend5_swish on random data of a CIFAR-10-sized training set
in memory (--loop-images, 50,000 by default, with the default validation split; the gather's cost
depends on it): the loop's images/s over a bare sess.run(train_op) loop's (loop_efficiency), and
the pipeline ceiling: the images/s the loop supplies when the step is trivial (it only reads one
element of the fed minibatch), the host-side ms per minibatch that makes (minibatch, feed,
recorder, a summary every 20 steps), and the ms of the Prefetcher's gather alone.
The last line is ``abu_over_relu=<x.xx> loop_efficiency=<y.yy> pipeline_over_step=<n>``: the fused
5_blend5_swish (unrestricted) step time over the fixed 1_relu one, the loop efficiency, and the
pipeline ceiling over the fused fixed 1_relu step's images/s. Targets (issues): ABU <= 1.05 x ReLU
(#23; 1.08 x on an AVX2 AMD EPYC before the kernels wrote into their inputs' buffers), adaptive
scaling <= 1.05 x fixed ReLU, an eval image < 1/3 of a train-step image, loop_efficiency >= 0.97 and
pipeline_over_step >= 20 on Intel and AMD CPUs (#23).
"""
import argparse
import contextlib
import copy
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import namedtuple

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import deepnet_network as net  # noqa: E402

tf = net.tf

Config = namedtuple("Config", "label af_set blend_mode trainable fused")

CONFIGS = [
    Config("1_relu fixed", "1_relu", "unrestricted", False, True),
    Config("1_relu adaptive scaling", "1_relu", "unrestricted", True, True),
    Config("1_relu fixed plain (before)", "1_relu", "unrestricted", False, False),
    Config("1_relu adaptive scaling plain (before)", "1_relu", "unrestricted", True, False),
    Config("5_blend5_swish unrestricted plain (before)", "5_blend5_swish", "unrestricted", True, False),
    Config("5_blend5_swish unrestricted fused (after)", "5_blend5_swish", "unrestricted", True, True),
    Config("5_blend5_swish normalized plain (before)", "5_blend5_swish", "normalized", True, False),
    Config("5_blend5_swish normalized fused (after)", "5_blend5_swish", "normalized", True, True),
]
RELU, ADAPTIVE, RELU_PLAIN, ABU_PLAIN, ABU = (CONFIGS[i].label for i in (0, 1, 2, 4, 5))


def bench_settings(config, seed=1):
    """The settings dict build_model reads, for one configuration."""
    return dict(network="smcn", af_set=config.af_set, blend_mode=config.blend_mode,
                blend_trainable=config.trainable, swish_beta_trainable=config.trainable, seed=seed,
                n_classes=10, use_wd=True, wd_lambda=0.004, optimizer="Adam")


class Runner:
    """One configuration's graph and session, with its timings."""

    def __init__(self, config, images, labels):
        self.config = config
        self.graph = tf.Graph()
        saved, net.FUSED_ABU = net.FUSED_ABU, config.fused
        try:
            with self.graph.as_default():
                self.model = net.build_model(bench_settings(config))
                init = tf.global_variables_initializer()
        finally:
            net.FUSED_ABU = saved
        self.sess = tf.Session(graph=self.graph)
        self.sess.run(init)
        inputs = self.model.inputs
        self.train_feed = {inputs.images: images, inputs.labels: labels, inputs.keep_probs: [0.5],
                           inputs.training: True}
        self.eval_feed = {inputs.images: images, inputs.labels: labels}
        self.train_times, self.eval_times, self.peak_rss = [], [], float("nan")
        self.step = 0

    def uses_fused_kernel(self):
        kernels = ("DeepnetAbuForward", "DeepnetScaledRelu")
        return any(op.type in kernels for op in self.graph.get_operations())

    def train_steps(self, n, record=True):
        for _ in range(n):
            self.train_feed[self.model.inputs.step] = self.step
            start = time.perf_counter()
            self.sess.run(self.model.train_op, self.train_feed)
            if record:
                self.train_times.append(time.perf_counter() - start)
            self.step += 1

    def eval_steps(self, n, record=True):
        for _ in range(n):
            start = time.perf_counter()
            self.sess.run([self.model.loss, self.model.top1], self.eval_feed)
            if record:
                self.eval_times.append(time.perf_counter() - start)


CIFAR_IMAGES = 50000  # the training loop's figures: a CIFAR-10-sized training set (the gather depends on it)


@contextlib.contextmanager
def bench_trainer(settings, batch=256, n_images=CIFAR_IMAGES):
    """A Trainer of the suite (deepnet.trainer) on random data in memory: n_images training images, the default
    validation split, -minibatch_size batch; validation, checkpoints and weight saving switched off, TensorBoard
    summaries every 20 steps as in a real run. Its run folder lives in a temporary folder."""
    import deepnet_main
    from deepnet import data, run_folder, trainer
    rng = np.random.default_rng(0)
    train = (rng.standard_normal((n_images, 32, 32, 3), dtype=np.float32),
             rng.integers(0, 10, n_images).astype(np.int64))
    test = (train[0][:batch].copy(), train[1][:batch].copy())
    with tempfile.TemporaryDirectory() as root:
        flags = ["-path_relative", root, "-network", settings["network"], "-af_set", settings["af_set"],
                 "-blend_mode", settings["blend_mode"], "-blend_trainable", str(settings["blend_trainable"]),
                 "-swish_beta_trainable", str(settings["swish_beta_trainable"]), "-minibatch_size", str(batch)]
        s = deepnet_main.check_flags(vars(deepnet_main.parser().parse_args(flags)))
        run_data = data.Data(train, test, data.make_split(n_images, s), batch)
        paths = run_folder.run_paths(s)
        os.makedirs(paths["run_dir"])  # as the run's lock makes it
        with trainer.StopRequest() as stop:
            loop = trainer.Trainer(s, paths, run_data, None, lambda line: None, stop)
            try:
                loop.val_mbs = loop.ckpt_mbs = loop.af_mbs = loop.all_mbs = set()
                loop.sess.run(loop.init_op)
                loop.record = trainer.new_recorder(s, run_data.mbs_per_epoch)
                yield loop
            finally:
                loop._close()


def timed_train(loop, n):
    """Seconds for n more steps of the suite's training loop (Trainer._train)."""
    loop.settings["n_minibatches"] = loop.record["mb_count_total"] + n
    start = time.perf_counter()
    loop._train()
    return time.perf_counter() - start


def measure_loop_efficiency(loop, steps, reps=3):
    """Images/s of the suite's training loop (Trainer._train, see bench_trainer) over images/s of a bare
    sess.run(train_op) loop with one fixed feed, on the same graph and session, alternating; the median of
    the reps' ratios."""
    s, inputs = loop.settings, loop.model.inputs
    images, labels = loop.data.minibatch(1, s["minibatch_size"], s)
    feed = {inputs.images: images, inputs.labels: labels, inputs.keep_probs: s["dropout_keep_probs"],
            inputs.training: True}

    def bare_loop(n):
        start = time.perf_counter()
        for _ in range(n):
            loop.sess.run(loop.model.train_op, feed)
        return time.perf_counter() - start

    timed_train(loop, 3), bare_loop(3)
    suite, bare = [], []
    for _ in range(reps):
        suite.append(timed_train(loop, steps))
        bare.append(bare_loop(steps))
    return float(np.median(np.array(bare) / np.array(suite)))


def trivial_model():
    """(a Model whose step only reads one element of the fed images and one label, with one scalar summary, in
    its own graph; a session on it with the suite's session config). Every feed is still converted and handed
    to TensorFlow, as a real step's is."""
    from deepnet import trainer
    graph = tf.Graph()
    with graph.as_default():
        inputs = net.make_inputs()
        value = inputs.images[0, 0, 0, 0] + tf.cast(inputs.labels[0], tf.float32)
        summaries = tf.summary.merge([tf.summary.scalar("objective/loss", value)])
        model = net.Model(inputs=inputs, logits=None, loss=value, cross_entropy=value, top1=value, top5=value,
                          predictions=None, train_op=tf.no_op(), endpoints=None, preact_stats={},
                          summaries=summaries, histograms={}, model_variables=[],
                          activation_kernel="trivial")
    graph.finalize()
    return model, tf.Session(graph=graph, config=trainer.session_config(trainer.current_threads()))


def measure_pipeline_ceiling(loop, steps, reps=5):
    """(images/s, host-side ms per minibatch): the suite's training loop (Trainer._train: the Prefetcher, the
    feed, the recorder, a summary every 20 steps) with a trivial step on the loop's data: the most images the
    loop can supply to a step, however fast. Median over reps of `steps` steps each, after one untimed round.
    (The trivial step's summary is one scalar; a real step's summaries are larger, written every 20 steps by
    the FileWriter's own thread.)"""
    from deepnet import trainer
    model, sess = trivial_model()
    trivial = copy.copy(loop)
    trivial.model, trivial.sess = model, sess
    trivial.record = trainer.new_recorder(loop.settings, loop.data.mbs_per_epoch)
    try:
        timed_train(trivial, steps)
        seconds = float(np.median([timed_train(trivial, steps) for _ in range(reps)])) / steps
    finally:
        sess.close()
    return loop.settings["minibatch_size"] / seconds, 1000 * seconds


def measure_gather(loop, steps):
    """ms per minibatch of the input pipeline alone (deepnet.pipeline.Prefetcher over Data.minibatch, nothing
    fed), over `steps` steps."""
    from deepnet import pipeline
    run_data, s = loop.data, loop.settings
    batch = s["minibatch_size"]
    start = time.perf_counter()
    with pipeline.Prefetcher(lambda step: run_data.minibatch(step, batch, s), 1, steps) as minibatches:
        for _ in minibatches:
            pass
    return 1000 * (time.perf_counter() - start) / steps


KERNEL_SHAPE = (256, 32, 32, 64)  # smcn's largest activation: conv1/conv2 outputs of a 256-image minibatch


def kernel_throughput(reps):
    """GB/s of activations (float32 elements x 4 bytes per second, so forward and backward compare with the
    same size) of each activation op alone, forward and backward, on smcn's largest activation tensor:
    TF's relu / ReluGrad, the fused scaled relu and the fused ABU. Medians over reps, taking turns."""
    rng = np.random.default_rng(0)
    graph = tf.Graph()
    with graph.as_default():
        x = tf.Variable(rng.normal(size=KERNEL_SHAPE).astype(np.float32))
        dy = tf.Variable(rng.normal(size=KERNEL_SHAPE).astype(np.float32))
        weights = tf.constant([0.3, 0.2, 0.2, 0.2, 0.1])
        beta = tf.constant(1.2)
        library = net._abu_library()
        ops = {"relu (TF)": (tf.nn.relu(x), tf.raw_ops.ReluGrad(gradients=dy, features=x)),
               "scaled relu (fused)": (library.deepnet_scaled_relu(x, weights[0]),
                                       library.deepnet_scaled_relu_grad(x, dy, weights[0])[0]),
               "ABU blend5 (fused)": (library.deepnet_abu_forward(x, weights, beta),
                                      library.deepnet_abu_backward(x, dy, weights, beta)[0])}
        targets = {(name, direction): tensor.op for name, pair in ops.items()
                   for direction, tensor in zip(("forward", "backward"), pair)}
        init = tf.global_variables_initializer()
    times = {key: [] for key in targets}
    with tf.Session(graph=graph) as sess:
        sess.run(init)
        for target in targets.values():
            sess.run(target)
        for _ in range(reps):
            for key, target in targets.items():
                start = time.perf_counter()
                sess.run(target)
                times[key].append(time.perf_counter() - start)
    gigabytes = 4 * int(np.prod(KERNEL_SHAPE)) / 1e9
    return {key: gigabytes / float(np.median(values)) for key, values in times.items()}


def print_kernel_throughput(reps):
    rates = kernel_throughput(reps)
    print(f"activation ops alone on {'x'.join(map(str, KERNEL_SHAPE))} float32, GB/s of activations "
          f"(median of {reps}):")
    for name in dict.fromkeys(name for name, _ in rates):
        fwd, bwd = rates[name, "forward"], rates[name, "backward"]
        print(f"  {name:22s} forward {fwd:6.2f}   backward {bwd:6.2f}   "
              f"(x relu: {rates['relu (TF)', 'forward'] / fwd:5.2f} / {rates['relu (TF)', 'backward'] / bwd:5.2f})")
    return rates


def time_side_by_side(runners, args):
    for runner in runners:
        runner.train_steps(args.warmup, record=False)
        runner.eval_steps(args.warmup, record=False)
    for round_index in range(args.reps):
        start = round_index % len(runners)  # rotate the order: no configuration always goes first
        for runner in runners[start:] + runners[:start]:
            runner.train_steps(args.steps)
            runner.eval_steps(args.steps)


def child_peak_rss(index, batch):
    """Peak RSS in bytes of a child process that runs only CONFIGS[index]."""
    command = [sys.executable, os.path.abspath(__file__), "--rss-child", str(index), "--batch", str(batch)]
    result = subprocess.run(command, capture_output=True, text=True)
    match = re.search(r"peak_rss_bytes=(\d+)", result.stdout)
    return int(match.group(1)) if match else float("nan")


def rss_child(index, images, labels):
    """Build CONFIGS[index], run two train steps and an eval pass, print the peak RSS."""
    runner = Runner(CONFIGS[index], images, labels)
    runner.train_steps(2)
    runner.eval_steps(1)
    print(f"peak_rss_bytes={peak_rss_bytes()}")


def peak_rss_bytes():
    """This process's peak RSS: VmHWM (ru_maxrss can carry the parent's peak over from the spawn)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def report(runners, batch):
    relu_ms = 1000 * np.median(next(r for r in runners if r.config.label == RELU).train_times)
    header = (f"{'configuration':44s} {'ms/step':>8s} {'images/s':>9s} {'x relu':>7s} {'peak RSS':>9s} "
              f"{'eval ms/img':>11s} {'train ms/img':>12s} {'eval/train':>10s}")
    print(header)
    print("-" * len(header))
    for r in runners:
        train_ms, eval_ms = 1000 * np.median(r.train_times), 1000 * np.median(r.eval_times)
        print(f"{r.config.label:44s} {train_ms:8.1f} {1000 * batch / train_ms:9.1f} {train_ms / relu_ms:7.3f} "
              f"{r.peak_rss / 2 ** 20:6.0f} MiB {eval_ms / batch:11.3f} {train_ms / batch:12.3f} "
              f"{eval_ms / train_ms:10.3f}")


def ratio(runners, label, base_label, reps):
    """Median over the rounds of label's train time over base_label's in the same round: paired, so a slow
    stretch of the machine, which slows both, does not count."""
    rounds = {r.config.label: np.reshape(r.train_times, (reps, -1)).sum(axis=1) for r in runners}
    return float(np.median(rounds[label] / rounds[base_label]))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1, help="train (and eval) steps per configuration per round")
    parser.add_argument("--reps", type=int, default=10, help="rounds over all configurations")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first")
    parser.add_argument("--batch", type=int, default=256, help="minibatch size")
    parser.add_argument("--quick", action="store_true", help="a short run: --reps 3 --warmup 1 --no-rss")
    parser.add_argument("--no-rss", action="store_true", help="skip the per-configuration peak-RSS children")
    parser.add_argument("--kernels-only", action="store_true", help="only the activation ops' GB/s")
    parser.add_argument("--loop-images", type=int, default=CIFAR_IMAGES,
                        help="training images in memory for the training loop's figures (default: CIFAR-10's)")
    parser.add_argument("--pipeline-steps", type=int, default=None,
                        help="trivial steps per timed round of the pipeline ceiling (default 1000, --quick 200)")
    parser.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.warmup, args.no_rss = 3, 1, True
    if args.pipeline_steps is None:
        args.pipeline_steps = 200 if args.quick else 1000
    if min(args.steps, args.reps, args.batch, args.pipeline_steps) < 1 or args.warmup < 0:
        parser.error("--steps, --reps, --batch and --pipeline-steps must be >= 1, --warmup >= 0")
    if args.loop_images < 2 * args.batch:
        parser.error(f"--loop-images must be at least 2 x --batch ({2 * args.batch}): the validation split takes "
                     "at least one minibatch and training needs another")
    return args


def main(argv=None):
    args = parse_args(argv)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.batch, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, args.batch).astype(np.int64)
    if args.rss_child is not None:
        return rss_child(args.rss_child, images, labels)
    with open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                   "unknown CPU")
    print(f"{cpu}; activation kernel: {net.kernel_state()}; {net.kernel_build()}")
    if net._abu_library() is None:
        print("activation ops alone: not timed, there is no fused kernel to time", file=sys.stderr)
    else:
        print_kernel_throughput(reps=5 if args.quick else 20)
    if args.kernels_only:
        return
    runners = [Runner(config, images, labels) for config in CONFIGS]
    for r in runners:
        if r.uses_fused_kernel() != r.config.fused:
            print(f"warning: '{r.config.label}' {'lacks' if r.config.fused else 'has'} the fused kernel",
                  file=sys.stderr)
    time_side_by_side(runners, args)
    for index, runner in enumerate(runners):
        runner.peak_rss = float("nan") if args.no_rss else child_peak_rss(index, args.batch)
    print(f"smcn, minibatch {args.batch}, {args.reps} rounds x {args.steps} steps, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    report(runners, args.batch)
    print(f"adaptive/fixed relu = {ratio(runners, ADAPTIVE, RELU, args.reps):.3f}   "
          f"fused/plain ABU (unrestricted) = {ratio(runners, ABU, ABU_PLAIN, args.reps):.3f}   "
          f"before: plain ABU/plain fixed relu = {ratio(runners, ABU_PLAIN, RELU_PLAIN, args.reps):.3f}")
    with bench_trainer(bench_settings(CONFIGS[5]), args.batch, args.loop_images) as loop:
        efficiency = measure_loop_efficiency(loop, steps=20, reps=1 if args.quick else 3)
        ceiling, host_ms = measure_pipeline_ceiling(loop, steps=args.pipeline_steps)
        gather_ms = measure_gather(loop, steps=args.pipeline_steps)
    step_rate = args.batch / np.median(next(r for r in runners if r.config.label == RELU).train_times)
    print(f"training loop on {args.loop_images} images: suite loop / bare sess.run loop images/s = {efficiency:.3f}")
    print(f"input pipeline: the suite loop with a trivial step supplies {ceiling:.0f} images/s ({host_ms:.2f} ms "
          f"host-side per minibatch of {args.batch}; the gather alone {gather_ms:.2f} ms), {ceiling / step_rate:.1f} x "
          f"the fused fixed 1_relu step's {step_rate:.0f} images/s")
    print(f"abu_over_relu={ratio(runners, ABU, RELU, args.reps):.2f} loop_efficiency={efficiency:.2f} "
          f"pipeline_over_step={ceiling / step_rate:.1f}")


if __name__ == "__main__":
    main()
