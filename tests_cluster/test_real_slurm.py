"""A real 2-task SLURM job array of the demo sweep, on the single-node SLURM of .ci/start_slurm.sh, in a folder whose
path has a space (and the other characters sbatch's #SBATCH lines and bash read specially).

Not part of the README's test command (it needs root and Debian's slurm packages); CI runs it after
starting SLURM.
"""
import glob
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from conftest import state_of  # noqa: E402
from deepnet import commands  # noqa: E402
from test_supervisor import TINY, sv, tiny_synthetic_root  # noqa: E402


FOLDER = "with space #1 %x 'q'"


def test_real_slurm_sweep(tmp_path, monkeypatch):
    root = tiny_synthetic_root(tmp_path / FOLDER)
    monkeypatch.setitem(sv.CLUSTER, "cpus", 1)
    monkeypatch.setitem(sv.CLUSTER, "mem", "1500M")
    monkeypatch.setitem(sv.CLUSTER, "time_minutes", 20)
    args = ["--sweep", "demo", "--specs", "relu", "--experiment", "slurm", "--backend", "slurm",
            "--set", f"path_relative={root}", *TINY]
    lines = []
    assert sv.main(args, out=lines.append) == 0
    assert any(line.startswith("Submitted batch job") for line in lines)
    deadline = time.time() + 600
    records = [os.path.join(root, "3_output_cifar", "slurm", "relu", f"run_{r}", f"record_relu_run_{r}.pkl")
               for r in (1, 2)]
    settings = [sv.run_settings(sv.SETTINGS, {}, {"path_relative": root}, "slurm", "relu", r) for r in (1, 2)]
    while time.time() < deadline and not all(state_of(s) == "complete" for s in settings):
        time.sleep(2)
    assert all(os.path.isfile(p) for p in records)
    assert all(state_of(s) == "complete" for s in settings)
    for s in settings:
        log = open(commands.run_paths(s)["log"]).read()
        assert "task " in log and "-walltime 10" in log and "test of the model of minibatch" in log
    jobs = os.path.join(root, "3_output_cifar", "slurm", "0_jobs")
    outputs = sorted(os.path.basename(path) for path in glob.glob(os.path.join(glob.escape(jobs), "slurm_*_*.out")))
    assert [name.rsplit("_", 1)[1] for name in outputs] == ["1.out", "2.out"]   # --output read whole, %A_%a replaced
    lines = []
    assert sv.main(args, out=lines.append) == 0                    # all complete: analysis only
    assert "every run is complete" in lines
    assert os.path.isfile(os.path.join(root, "3_output_cifar", "slurm", "0_analysis",
                                       "main_performance_analysis.csv"))
