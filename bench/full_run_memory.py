"""Peak memory of a CIFAR-10-sized run: 50,000 training and 10,000 test images, minibatch 256.

    python bench/full_run_memory.py [--af-set 5_blend5_swish] [--minibatches 40]

Writes a full-size synthetic CIFAR-10 (official format) to a temporary folder, preprocesses it
(ztrans), then runs deepnet_main.py as a child process: training with validations on the 2,560
held-out images, checkpoints, the early-stopping test on 10,000 images. Prints the child's peak RSS
as `full_run_peak_rss_gb=<x.xx>` (target: at most 2.5).
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--af-set", default="5_blend5_swish")
    p.add_argument("--minibatches", type=int, default=40)
    args = p.parse_args(argv)
    import deepnet_task_cifar_preprocessing as prep
    with tempfile.TemporaryDirectory() as root:
        prep.write_synthetic_raw(root, "cifar10", n_train=50000, n_test=10000)
        prep.preprocess_task(root, "cifar10", ["ztrans"])
        command = [sys.executable, os.path.join(REPO, "deepnet_main.py"), "-path_relative", root,
                   "-experiment_name", "memory", "-spec_name", "full", "-af_set", args.af_set,
                   "-blend_trainable", "True", "-swish_beta_trainable", "True",
                   "-n_minibatches", str(args.minibatches), "-val_every", str(max(args.minibatches // 2, 1)),
                   "-epochs_between_checkpoints", "1"]
        started = time.time()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 2 ** 30
    print(f"{args.af_set}, {args.minibatches} minibatches of 256 on 50,000/10,000 images: "
          f"{time.time() - started:.0f} s")
    print(f"full_run_peak_rss_gb={peak_gb:.2f}")


if __name__ == "__main__":
    main()
