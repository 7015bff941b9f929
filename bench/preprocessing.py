"""Benchmark the CIFAR preprocessing at full CIFAR-10 size: 60,000 synthetic images, all three variants.

    python bench/preprocessing.py

Writes the synthetic raw batches into a temporary folder, then times the real command line
(deepnet_task_cifar_preprocessing.py --task cifar10 --variant all) as a child process and reports its wall time
and peak resident memory (ru_maxrss of the child). Targets from the issue: under 60 s and under 4 GB on 2 cores.
"""
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from deepnet_task_cifar_preprocessing import write_synthetic_raw  # noqa: E402


def main():
    with tempfile.TemporaryDirectory(prefix="bench_preprocessing_") as root:
        write_synthetic_raw(root, "cifar10", n_train=50000, n_test=10000)
        command = [sys.executable, os.path.join(REPO, "deepnet_task_cifar_preprocessing.py"),
                   "--root", root, "--task", "cifar10", "--variant", "all"]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9  # Linux reports KiB
    print(f"preprocessing_seconds={seconds:.1f} peak_rss_gb={peak_gb:.2f} "
          f"(targets < 60 s, < 4 GB; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
