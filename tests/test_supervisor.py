"""deepnet_supervisor: commands, selections, overrides, job scripts, skip logic, --status, runs running
elsewhere, worker lifetime, a real local sweep.

The real SLURM sweep is in tests_cluster/ (it needs the single-node SLURM that .ci/start_slurm.sh starts).
"""
import glob
import json
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest

from deepnet import cluster, commands, estimate, local, status  # noqa: E402
import deepnet_supervisor as sv
from conftest import state_of
from deepnet_util import EXIT_RUNNING_ELSEWHERE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

# The command of one run of the paper sweep, written out by hand: every deepnet_main flag in the supervisor's order.
EXPECTED_ABU_S_RUN_5 = (
    "-mode training -experiment_name exp1 -spec_name smcn_adam_c10_ABU_S_TERIS -run 5 -path_relative {root} "
    "-task cifar10 -preprocessing ztrans -create_val_set True -val_set_fraction 0.05 -network smcn "
    "-bn_inference batch_statistics -af_set 5_blend5_swish -af_weights_init default -load_af_weights_from none "
    "-load_af_weights_experiment '' -norm_blendw_at_init False -blend_trainable True -blend_mode softmaxed "
    "-swish_beta_trainable True -optimizer Adam -minibatch_size 256 -dropout_keep_probs 0.6 0.7 0.8 "
    "-dropout_keep_probs_inference 1.0 -use_wd False -wd_lambda 0.01 -seed 7 -n_minibatches 1000 -lr 0.001 "
    "-lr_schedule_type constant -lr_decay 4e-05 -lr_lin_min 0.0004 -lr_lin_steps 60000 -lr_step_ep 200 250 300 "
    "-lr_step_multi 0.1 0.01 0.001 -walltime 0 -val_every 20 -create_checkpoints True "
    "-epochs_between_checkpoints 8 -safe_af_ws_n 60 -safe_all_ws_n 2 -save_af_weights_at_test_mb True "
    "-save_all_weights_at_test_mb True -create_lc_on_the_fly True")
FAKE_TIMING = (0.5, 0.001)    # seconds per training step, per inference image: dry runs time nothing here


@pytest.fixture(autouse=True)
def fake_step_timing(monkeypatch):
    """A dry run's estimate times real training steps; these tests check everything but that, so quickly."""
    monkeypatch.setattr(estimate, "time_steps", lambda settings, threads, deadline, **kw: FAKE_TIMING)


def run_supervisor(args, env=None, timeout=900):
    return subprocess.run([PY, "deepnet_supervisor.py", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=timeout)


def write_record(root, experiment, spec, run, **fields):
    folder = os.path.join(root, "3_output_cifar", experiment, spec, f"run_{run}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"record_{spec}_run_{run}.pkl")
    with open(path, "wb") as handle:
        pickle.dump({"spec_name": spec, "run": run, "test_completed": False, "diverged": False, **fields}, handle)
    return path


def load_record(root, experiment, spec, run):
    path = os.path.join(root, "3_output_cifar", experiment, spec, f"run_{run}", f"record_{spec}_run_{run}.pkl")
    with open(path, "rb") as handle:
        return pickle.load(handle)


# ---------------------------------------------------------------- settings and specs

def test_settings_are_every_deepnet_main_flag_with_its_default():
    import deepnet_main
    defaults = {name: default for name, _, default, *_ in deepnet_main.FLAGS}
    assert set(sv.SETTINGS) | set(commands.PER_RUN_FLAGS) == set(defaults)
    assert not set(sv.SETTINGS) & set(commands.PER_RUN_FLAGS)
    for key, value in sv.SETTINGS.items():
        assert value == defaults[key], key


def test_demo_sweep_is_relu_against_abu():
    """The paper's sweeps are checked against the original scheduler in test_paper_sweeps.py."""
    assert sv.SWEEPS["demo"]["specs"] == {
        "relu": {"af_set": "1_relu", "blend_trainable": False, "swish_beta_trainable": False,
                 "blend_mode": "unrestricted"},
        "ABU": {"af_set": "5_blend5_swish", "blend_trainable": True, "swish_beta_trainable": True,
                "blend_mode": "unrestricted"}}
    assert sv.SWEEPS["demo"]["runs"] == "1-2" and sv.SWEEPS["demo"]["settings"]["n_minibatches"] == 250


def test_parse_runs():
    assert sv.parse_runs("1-3,7") == [1, 2, 3, 7]
    assert sv.parse_runs("5") == [5]
    assert sv.parse_runs("3,1-2,2") == [1, 2, 3]
    assert sv.parse_runs("1-30") == list(range(1, 31))


def test_cluster_walltime_and_time_formats():
    assert cluster.cluster_walltime({"time_minutes": 1440}) == 1440 - 72
    assert cluster.cluster_walltime({"time_minutes": 60}) == 50
    assert cluster.slurm_time(1440 + 90) == "1-01:30:00"
    assert cluster.slurm_time(45) == "0-00:45:00"


# ---------------------------------------------------------------- dry run

def test_dry_run_prints_the_exact_commands(tmp_path, capsys):
    root = str(tmp_path)
    code = sv.main(["--dry-run", "--specs", "smcn_adam_c10_ABU_S_TERIS,smcn_adam_c10_relu", "--runs", "2,5-6",
                    "--experiment", "exp1",
                    "--set", "n_minibatches=1000", "--set", "dropout_keep_probs=0.6,0.7,0.8", "--set", "seed=7",
                    "--set", f"path_relative={root}"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 7
    words = [shlex.split(line) for line in lines[:-1]]
    abu, relu = "smcn_adam_c10_ABU_S_TERIS", "smcn_adam_c10_relu"
    assert [(w[w.index("-spec_name") + 1], w[w.index("-run") + 1]) for w in words] == \
        [(abu, "2"), (abu, "5"), (abu, "6"), (relu, "2"), (relu, "5"), (relu, "6")]
    assert lines[1] == f"{shlex.quote(PY)} deepnet_main.py " + EXPECTED_ABU_S_RUN_5.format(root=root)
    relu = words[3]
    assert relu[relu.index("-af_set") + 1] == "1_relu" and relu[relu.index("-blend_trainable") + 1] == "False"
    assert lines[-1].startswith("6 runs, 6,000 minibatches in all; estimated wall time ")
    assert not list(tmp_path.iterdir())                          # a dry run writes nothing


def test_demo_sweep_and_set_overrides(tmp_path, capsys):
    assert sv.main(["--dry-run", "--sweep", "demo", "--set", f"path_relative={tmp_path}",
                    "--set", "use_wd=True", "--set", "blend_mode=normalized"]) == 0
    words = [shlex.split(line) for line in capsys.readouterr().out.splitlines()[:-1]]
    assert len(words) == 4
    for w in words:
        flag = lambda name: w[w.index(name) + 1]  # noqa: E731
        assert flag("-experiment_name") == "demo_smcn_cifar10"
        assert flag("-n_minibatches") == "250" and flag("-val_every") == "25"
        assert flag("-minibatch_size") == "40" and flag("-val_set_fraction") == "0.02"
        assert flag("-epochs_between_checkpoints") == "1" and flag("-use_wd") == "True"
        assert flag("-blend_mode") == "normalized"                # --set wins over the spec
        assert "-seed" not in w                                   # default: the run number


BAD_INPUT = [
    (["--specs", "smcn_adam_c10_relu,nope"], "--specs: unknown spec(s) nope"),
    (["--set", "nope=1"], "--set nope: unknown setting"),
    (["--set", "n_minibatches"], "--set n_minibatches: expected key=value"),
    (["--set", "n_minibatches=abc"], "--set n_minibatches=abc"),
    (["--set", "use_wd=maybe"], "--set use_wd=maybe"),
    (["--runs", "5-2"], "--runs 5-2"),
    (["--runs", "1,x"], "--runs 1,x"),
    (["--workers", "0"], "--workers 0"),
    (["--sweep", "nope"], "--sweep nope: unknown sweep"),
    (["--backend", "pbs"], "--backend pbs"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--status", "--runs", "x"], "--runs x"),
    (["--status", "--specs", "nope"], "--specs: unknown spec(s) nope"),
    (["--status", "--workers", "two"], "--workers two"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = run_supervisor([*args, "--set", f"path_relative={tmp_path}"])
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert not list(tmp_path.iterdir())


def test_values_deepnet_main_refuses_are_user_errors(tmp_path):
    with pytest.raises(sv.UserError, match="-blend_mode: 'nope'"):
        sv.main(["--dry-run", "--set", "blend_mode=nope", "--set", f"path_relative={tmp_path}"])
    with pytest.raises(sv.UserError, match="-dropout_keep_probs"):
        sv.main(["--dry-run", "--set", "dropout_keep_probs=0.5,0.5", "--set", f"path_relative={tmp_path}"])


def test_missing_sbatch_is_one_line_exit_2(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))                   # no sbatch / qsub on this PATH
    for backend, tool in (("slurm", "sbatch"), ("sge", "qsub")):
        result = run_supervisor(["--backend", backend, "--set", f"path_relative={tmp_path}"], env=env)
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.count("\n") == 1 and f"'{tool}' not found" in result.stderr
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- skip logic

def test_complete_runs_are_not_started_and_untested_diverged_runs_are(tmp_path, capsys):
    root, experiment = str(tmp_path), "demo_smcn_cifar10"
    write_record(root, experiment, "relu", 1, test_completed=True)
    write_record(root, experiment, "relu", 2)                                       # incomplete: resume
    write_record(root, experiment, "ABU", 1, test_completed=True, diverged=True, diverged_at_mb=17)  # tested
    garbage = os.path.join(root, "3_output_cifar", experiment, "ABU", "run_2", "record_ABU_run_2.pkl")
    os.makedirs(os.path.dirname(garbage))
    with open(garbage, "wb") as handle:
        handle.write(b"not a pickle")                                                # unreadable: restart
    assert sv.main(["--dry-run", "--sweep", "demo", "--set", f"path_relative={root}"]) == 0
    captured = capsys.readouterr()
    started = [shlex.split(line) for line in captured.out.splitlines()[:-1]]                 # the last: the estimate
    assert [(w[w.index("-spec_name") + 1], w[w.index("-run") + 1]) for w in started] == [("relu", "2"), ("ABU", "2")]
    assert "2 of 4 runs already complete: skipped" in captured.err
    write_record(root, experiment, "ABU", 1, diverged=True, diverged_at_mb=17)     # diverged, not tested (older)
    assert sv.main(["--dry-run", "--sweep", "demo", "--set", f"path_relative={root}"]) == 0
    started = [shlex.split(line) for line in capsys.readouterr().out.splitlines()[:-1]]
    assert [(w[w.index("-spec_name") + 1], w[w.index("-run") + 1]) for w in started] == [
        ("relu", "2"), ("ABU", "1"), ("ABU", "2")]


# ---------------------------------------------------------------- job scripts

FAKE_PYTHON = """#!/bin/sh
# stands in for python on a node: the job's entry point (-m deepnet.cluster) runs in the real python; a run prints
# how many arguments arrived, then each on its own line
[ "$1" = -m ] && exec REAL_PYTHON "$@"
echo "argc $#"
for a in "$@"; do echo "arg [$a]"; done
"""


@pytest.mark.parametrize("backend", ["slurm", "sge"])
def test_job_array_scripts(tmp_path, capsys, monkeypatch, backend):
    root = str(tmp_path / "root")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.replace("REAL_PYTHON", shlex.quote(PY)))
    fake.chmod(0o755)
    monkeypatch.setitem(sv.CLUSTER, "python", str(fake))
    monkeypatch.setitem(sv.CLUSTER, "time_minutes", 120)
    monkeypatch.setitem(sv.CLUSTER, "max_parallel", 3)
    monkeypatch.setitem(sv.CLUSTER, "slurm_partition", "short")
    monkeypatch.setitem(sv.CLUSTER, "sge_queue", "all.q")
    write_record(root, "exp2", "relu", 2, test_completed=True)                       # left out of the array
    assert sv.main(["--backend", backend, "--dry-run", "--sweep", "demo", "--specs", "relu,ABU", "--runs", "1-3",
                    "--experiment", "exp2", "--set", f"path_relative={root}"]) == 0
    exp = os.path.join(root, "3_output_cifar", "exp2")
    [script] = glob.glob(os.path.join(exp, "0_jobs", f"exp2_{backend}_*.sh"))
    tasks_file = script[:-len(".sh")] + "_tasks.jsonl"
    assert f"wrote {script} (5 tasks)" in capsys.readouterr().out
    text = open(script).read()
    variable = "SLURM_ARRAY_TASK_ID" if backend == "slurm" else "SGE_TASK_ID"
    assert f'exec {fake} -m deepnet.cluster {tasks_file} "${{{variable}}}"' in text.splitlines()
    if backend == "slurm":
        for line in ("#SBATCH --array=1-5%3", "#SBATCH --time=0-02:00:00", "#SBATCH --cpus-per-task=4",
                     "#SBATCH --mem=16G", "#SBATCH --partition=short", "#SBATCH --job-name=exp2"):
            assert line in text.splitlines()
    else:
        for line in ("#$ -t 1-5", "#$ -tc 3", "#$ -pe smp 4", "#$ -l h_rt=02:00:00,h_vmem=16G", "#$ -q all.q",
                     "#$ -N exp2"):
            assert line in text.splitlines()
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    tasks = [json.loads(line) for line in open(tasks_file).read().splitlines()]
    assert [(t["spec"], t["run"]) for t in tasks] == [("relu", 1), ("relu", 3), ("ABU", 1), ("ABU", 2), ("ABU", 3)]
    for task in tasks:
        spec, run, log, words = task["spec"], task["run"], task["log"], task["argv"]
        assert log == os.path.join(exp, spec, f"run_{run}", f"log_{spec}_run_{run}.txt")
        assert words[:2] == [str(fake), "deepnet_main.py"]
        assert words[words.index("-walltime") + 1] == "110"          # 120 min job - 10 min margin
    # run task 4 as the scheduler would: it must pick line 4 and pass every argument intact
    result = subprocess.run(["bash", script], env=dict(os.environ, **{variable: "4"}), capture_output=True)
    assert result.returncode == 0, result.stderr
    log = open(tasks[3]["log"]).read().splitlines()
    expected = tasks[3]["argv"][1:]
    assert log[0].startswith("=== ") and "task 4" in log[0]
    assert log[1] == f"argc {len(expected)}"
    assert log[2:] == [f"arg [{a}]" for a in expected]
    assert "arg []" in log                                            # -load_af_weights_from ''


# ---------------------------------------------------------------- local pool with stand-in runs

FAKE_RUN = """import os, pickle, signal, subprocess, sys, time
record_path, mode, marker = sys.argv[1:4]
print("fake run", mode, flush=True)
if mode == "fail":
    sys.exit(3)
if mode == "locked":  # another process takes the lock just before this one: deepnet_main's exit 75
    folder, here = os.path.dirname(record_path), os.path.dirname(marker)
    holder = subprocess.Popen([sys.executable, os.path.join(here, "hold_lock.py"), os.path.join(folder, ".lock"),
                               os.path.join(here, "release_locked"), record_path, "complete"], stdout=subprocess.PIPE)
    holder.stdout.readline()
    print(f"error: {folder}: this run is already running (process {holder.pid} on {os.uname().nodename})")
    sys.exit(75)
if mode == "sleep":
    def stop(signum, frame):
        open(marker + ".tmp", "w").write("checkpointed")
        os.replace(marker + ".tmp", marker)
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    time.sleep(60)
    sys.exit(0)
with open(record_path, "wb") as handle:
    pickle.dump({"test_completed": mode == "ok", "diverged": False}, handle)
"""


def fake_runs(tmp_path, monkeypatch, modes):
    """Settings of stand-in runs and a patched command() that starts FAKE_RUN in the given mode."""
    script = tmp_path / "fake_run.py"
    script.write_text(FAKE_RUN)
    root = str(tmp_path / "root")
    runs = [sv.run_settings(sv.SETTINGS, {}, {"path_relative": root}, "exp", spec, run) for spec, run in modes]

    def command(settings, python=None):
        spec, run = settings["spec_name"], settings["run"]
        record = os.path.join(commands.run_paths(settings)['run_dir'], f"record_{spec}_run_{run}.pkl")
        return [PY, str(script), record, modes[spec, run], str(tmp_path / f"stopped_{spec}_{run}")]

    monkeypatch.setattr(commands, "command", command)
    return runs


def test_local_pool_reports_progress_and_failures(tmp_path, monkeypatch):
    modes = {("a", 1): "ok", ("a", 2): "fail", ("b", 1): "ok", ("b", 2): "walltime"}
    runs = fake_runs(tmp_path, monkeypatch, modes)
    lines = []
    counts = local.run_local(runs, 2, lines.append)
    assert counts == {"complete": 2, "incomplete": 1, "diverged": 0, "failed": 1}
    progress = [line for line in lines if line.startswith("[")]
    assert sorted(line.split("]")[0] for line in progress) == ["[1/4", "[2/4", "[3/4", "[4/4"]
    failed = next(line for line in progress if " a run 2:" in line)
    assert f"FAILED (exit status 3), log: {commands.run_paths(runs[1])['log']}" in failed
    assert "failures 1" in progress[-1] and "ETA 0:00:00" in progress[-1]
    assert any("b run 2: stopped before the end" in line for line in progress)
    assert lines[-1] == "finished: 2 complete, 1 failed, 1 incomplete, 0 diverged"
    # logs are appended, never overwritten
    local.run_local(runs[1:2], 1, lambda line: None)
    log = open(commands.run_paths(runs[1])['log']).read()
    assert log.count("deepnet_supervisor:") == 2 and log.count("fake run fail") == 2
    assert state_of(runs[0]) == "complete" and state_of(runs[3]) == "incomplete"


def test_interrupt_stops_the_children_with_sigterm(tmp_path, monkeypatch):
    modes = {("a", 1): "sleep", ("a", 2): "sleep", ("a", 3): "ok"}
    runs = fake_runs(tmp_path, monkeypatch, modes)

    def interrupt_when_started():
        deadline = time.time() + 60
        while time.time() < deadline:
            logs = [commands.run_paths(s)['log'] for s in runs[:2]]
            if all(os.path.exists(p) and "fake run sleep" in open(p).read() for p in logs):
                break
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    lines = []
    thread = threading.Thread(target=interrupt_when_started)
    thread.start()
    with pytest.raises(KeyboardInterrupt):
        local.run_local(runs, 2, lines.append)
    thread.join()
    for run in (1, 2):
        assert (tmp_path / f"stopped_a_{run}").read_text() == "checkpointed"
    assert not os.path.exists(commands.run_paths(runs[2])['log'])                   # never started
    assert any(line.startswith("interrupted: stopping 2 running run(s)") for line in lines)


# ---------------------------------------------------------------- runs another process holds

HOLD_LOCK = """import os, pickle, sys, time
sys.path.insert(0, REPO_DIR)
from deepnet_util import RunLock
lock, release, record, final = sys.argv[1:5]
with RunLock(lock):
    print("locked", flush=True)
    deadline = time.time() + 120
    while not os.path.exists(release) and time.time() < deadline:
        time.sleep(0.05)
    if final == "complete":
        with open(record, "wb") as handle:
            pickle.dump({"test_completed": True, "diverged": False}, handle)
"""


@pytest.fixture
def hold_lock(tmp_path):
    """hold_lock(settings, final) -> (process holding the run's lock, release file); on release it writes a
    complete recorder (final 'complete') or nothing, then ends. Every holder is released at teardown."""
    script = tmp_path / "hold_lock.py"
    script.write_text(HOLD_LOCK.replace("REPO_DIR", repr(REPO)))
    started = []

    def start(settings, final="none"):
        os.makedirs(commands.run_paths(settings)['run_dir'], exist_ok=True)
        release = tmp_path / f"release_{len(started)}"
        proc = subprocess.Popen([PY, str(script), commands.run_paths(settings)["lock"], str(release), commands.run_paths(settings)['record'],
                                 final], stdout=subprocess.PIPE, text=True)
        started.append((proc, release))
        assert proc.stdout.readline() == "locked\n"
        return proc, release

    yield start
    for proc, release in started + [(None, tmp_path / "release_locked")]:
        release.touch()
    for proc, _ in started:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def holder_text(proc):
    return f"process {proc.pid} on {os.uname().nodename}"


def sweep_args(**changes):
    return sv.argparse.Namespace(**{"dry_run": False, "backend": "local", "no_wait": False, "no_analysis": False,
                                    "workers": 2, "sweep": "demo", **changes})


@pytest.fixture
def no_data_no_analysis(monkeypatch):
    """sweep() without data preparation; analyse() records whether some run was still held when called."""
    calls = []
    monkeypatch.setattr(local, "ensure_data", lambda *args, **kwargs: None)
    monkeypatch.setattr(local, "ELSEWHERE_POLL_S", 0.1)

    def analyse(settings, out=print):
        calls.append(settings["experiment_name"])
        return True
    monkeypatch.setattr(sv, "analyse", analyse)
    return calls


@pytest.mark.parametrize("final", ["complete", "incomplete"])
def test_run_held_elsewhere_is_waited_for_then_counted_or_resumed(tmp_path, monkeypatch, hold_lock,
                                                                   no_data_no_analysis, final):
    runs = fake_runs(tmp_path, monkeypatch, {("a", 1): "ok", ("a", 2): "ok"})
    holder, release = hold_lock(runs[0], final)
    lines = []

    def out(line):
        lines.append(line)
        if "a run 2: complete" in line:          # the free run has finished: let the held one end
            release.touch()

    assert sv.sweep(sweep_args(), runs, out) == 0
    assert f"a run 1: running elsewhere ({holder_text(holder)})" in lines
    assert "waiting for 1 run(s) running elsewhere to end (--no-wait leaves them)" in lines
    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == 2 and not any("FAILED" in line for line in lines)
    assert "(+ 1 running elsewhere)" in progress[0]
    if final == "complete":
        assert progress[1].startswith("[2/2] a run 1: complete (ran elsewhere) | failures 0")
        assert not os.path.exists(commands.run_paths(runs[0])['log'])              # never launched here
    else:
        assert "a run 1: ended elsewhere unfinished; resuming it here" in lines
        assert progress[1].startswith("[2/2] a run 1: complete in ")
        assert "fake run ok" in open(commands.run_paths(runs[0])['log']).read()
    assert holder.poll() is not None and no_data_no_analysis == ["exp"]   # analysed once, after both ended
    assert lines[-1] == "finished: 2 complete, 0 failed, 0 incomplete, 0 diverged"


def test_no_wait_leaves_runs_held_elsewhere_and_skips_the_analysis(tmp_path, monkeypatch, hold_lock,
                                                                  no_data_no_analysis):
    runs = fake_runs(tmp_path, monkeypatch, {("a", 1): "ok", ("a", 2): "ok"})
    holder, _ = hold_lock(runs[0])
    lines = []
    assert sv.sweep(sweep_args(no_wait=True), runs, lines.append) == 1
    assert f"a run 1: running elsewhere ({holder_text(holder)})" in lines
    [progress] = [line for line in lines if line.startswith("[")]
    assert progress.startswith("[1/2] a run 2: complete in ") and progress.endswith("(+ 1 running elsewhere)")
    assert lines[-2] == "finished: 1 complete, 0 failed, 0 incomplete, 0 diverged, 1 still running elsewhere"
    assert lines[-1] == ("analysis skipped: 1 run(s) still running elsewhere (a run 1); run this command again "
                         "once they have ended")
    assert no_data_no_analysis == [] and holder.poll() is None and not os.path.exists(commands.run_paths(runs[0])['log'])


def test_a_run_that_loses_the_lock_race_is_not_a_failure(tmp_path, monkeypatch, hold_lock, no_data_no_analysis):
    runs = fake_runs(tmp_path, monkeypatch, {("a", 1): "locked", ("a", 2): "ok"})
    lines = []

    def out(line):
        lines.append(line)
        if "a run 1: running elsewhere" in line:
            (tmp_path / "release_locked").touch()

    assert sv.sweep(sweep_args(), runs, out) == 0                      # (hold_lock wrote hold_lock.py)
    assert "fake run locked" in open(commands.run_paths(runs[0])['log']).read()      # launched, then exit 75
    assert any(line.startswith("a run 1: running elsewhere (process ") for line in lines)
    assert not any("FAILED" in line for line in lines)
    assert any(line.startswith("[2/2] a run 1: complete (ran elsewhere)") for line in lines)
    assert no_data_no_analysis == ["exp"]


def test_lock_race_is_read_from_the_exit_status(tmp_path, hold_lock):
    settings = sv.run_settings(sv.SETTINGS, {}, {"path_relative": str(tmp_path)}, "exp", "a", 1)
    os.makedirs(commands.run_paths(settings)['run_dir'])
    assert local.locked_elsewhere(settings, EXIT_RUNNING_ELSEWHERE) == "another process"   # the lock is free by now
    assert local.locked_elsewhere(settings, 2) == "" and local.locked_elsewhere(settings, 1) == ""
    holder, _ = hold_lock(settings)
    assert local.locked_elsewhere(settings, EXIT_RUNNING_ELSEWHERE) == holder_text(holder)
    assert local.locked_elsewhere(settings, 2) == ""                  # bad input is bad input, whoever holds the lock


def test_dry_runs_leave_out_runs_held_elsewhere(tmp_path, capsys, hold_lock):
    root = str(tmp_path / "root")
    held = sv.run_settings(sv.SETTINGS, {}, {"path_relative": root}, "demo_smcn_cifar10", "relu", 1)
    holder, _ = hold_lock(held)
    assert sv.main(["--dry-run", "--sweep", "demo", "--set", f"path_relative={root}"]) == 0
    captured = capsys.readouterr()
    started = [shlex.split(line) for line in captured.out.splitlines()[:-1]]
    assert [(w[w.index("-spec_name") + 1], w[w.index("-run") + 1]) for w in started] == \
        [("relu", "2"), ("ABU", "1"), ("ABU", "2")]
    assert captured.out.splitlines()[-1].startswith("3 runs, 750 minibatches in all")
    assert f"relu run 1: running elsewhere ({holder_text(holder)})" in captured.err
    assert sv.main(["--backend", "slurm", "--dry-run", "--sweep", "demo", "--set", f"path_relative={root}"]) == 0
    [tasks] = glob.glob(os.path.join(root, "3_output_cifar", "demo_smcn_cifar10", "0_jobs", "*_tasks.jsonl"))
    assert [[task["spec"], task["run"]] for task in map(json.loads, open(tasks).read().splitlines())] == \
        [["relu", 2], ["ABU", 1], ["ABU", 2]]


# ---------------------------------------------------------------- worker lifetime

STAND_IN_SUPERVISOR = """import os, sys, time
sys.path.insert(0, REPO_DIR)
from deepnet import local
child, marker, log = sys.argv[1:4]
proc = local.start_process([sys.executable, child, marker], open(log, "ab"), dict(os.environ))
print(proc.pid, flush=True)
time.sleep(120)
"""
LONG_CHILD = """import os, signal, sys, time
marker = sys.argv[1]
def mark(path, text):  # whole or not at all: a reader never sees an empty file
    open(path + ".tmp", "w").write(text)
    os.replace(path + ".tmp", path)
def stop(signum, frame):
    mark(marker, signal.Signals(signum).name)
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
mark(marker + ".ready", "ready")
time.sleep(120)
"""


def test_a_worker_gets_sigterm_when_its_supervisor_is_killed(tmp_path):
    stand_in, child = tmp_path / "supervisor.py", tmp_path / "child.py"
    stand_in.write_text(STAND_IN_SUPERVISOR.replace("REPO_DIR", repr(REPO)))
    child.write_text(LONG_CHILD)
    marker = tmp_path / "signal"
    supervisor = subprocess.Popen([PY, str(stand_in), str(child), str(marker), str(tmp_path / "log")],
                                  stdout=subprocess.PIPE, text=True)
    child_pid = None
    try:
        child_pid = int(supervisor.stdout.readline())
        deadline = time.time() + 60
        while not os.path.exists(f"{marker}.ready") and time.time() < deadline:
            time.sleep(0.05)
        assert os.path.exists(f"{marker}.ready")
        assert os.getsid(child_pid) == child_pid                          # its own session: no terminal Ctrl-C
        supervisor.kill()
        supervisor.wait(timeout=60)
        deadline = time.time() + 60
        while not marker.exists() and time.time() < deadline:
            time.sleep(0.05)
        assert marker.read_text() == "SIGTERM"
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
        supervisor.stdout.close()
        if child_pid is not None:
            try:
                os.kill(child_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---------------------------------------------------------------- --status

def write_status(settings, **fields):
    os.makedirs(commands.run_paths(settings)['run_dir'], exist_ok=True)
    status = {"state": "running", "pid": 1, "host": "n1", "mb": 0, "n_minibatches": 1000, "val_top1": None,
              "test_top1": None, "last_checkpoint_mb": None, "train_seconds": 0.0, "updated": 0.0, "message": "",
              **fields}
    with open(commands.run_paths(settings)['status'], "w") as handle:
        json.dump(status, handle)


def tree(root):
    """Every path under root with its size and modification time."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            info = os.stat(path)
            found[path] = (info.st_size, info.st_mtime_ns)
    return found


def test_status_shows_every_state_counts_and_the_eta_and_writes_nothing(tmp_path, hold_lock):
    root, host = str(tmp_path / "root"), os.uname().nodename
    run = {(spec, n): sv.run_settings(sv.SETTINGS, {}, {"path_relative": root, "n_minibatches": 1000},
                                      "exp", spec, n) for spec in ("relu", "ABU") for n in range(1, 5)}
    write_status(run["relu", 1], state="complete", mb=1000, val_top1=0.81, test_top1=0.8, last_checkpoint_mb=1000,
                 train_seconds=100.0, activation_kernel="fused")
    holder, _ = hold_lock(run["relu", 2])
    write_status(run["relu", 2], pid=holder.pid, host=host, mb=400, val_top1=0.5, last_checkpoint_mb=300,
                 train_seconds=41.0)
    write_status(run["relu", 3], state="incomplete", mb=650, val_top1=0.6, last_checkpoint_mb=600,
                 train_seconds=70.0, message="walltime reached")
    write_status(run["relu", 4], pid=999999, host="n9", mb=250, val_top1=0.4, last_checkpoint_mb=200)
    open(commands.run_paths(run["relu", 4])['lock'], "w").write("process 999999 on n9\n")     # a lock nobody holds
    write_status(run["ABU", 1], state="complete", mb=122, val_top1=0.0, test_top1=0.3, diverged_at_mb=123,
                 activation_kernel="plain: DEEPNET_FUSED_ABU=0")
    write_status(run["ABU", 2], state="failed", mb=0, message="ValueError: boom")
    write_record(root, "exp", "ABU", 4, test_completed=True, mb_count_total=1000, settings={"n_minibatches": 1000},
                 val_top1_hist=[0.5, 0.7], test_top1=0.69, checkpoints=[500, 1000])   # older run: no status.json
    before = tree(root)
    result = run_supervisor(["--status", "--sweep", "demo", "--runs", "1-4", "--experiment", "exp",
                             "--workers", "2", "--set", f"path_relative={root}", "--set", "n_minibatches=1000"])
    assert result.returncode == 0 and result.stderr == ""
    assert tree(root) == before
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["spec", "run", "state", "minibatches", "val", "top-1", "test", "top-1", "kernel",
                                "details"]
    rows = {tuple(line.split()[:2]): line for line in lines[1:9]}
    expected = {  # the kernel column: what status.json says the run's activations ran on ('-': not recorded)
        ("relu", "1"): "relu  1    complete     1000/1000    0.8100     0.8000      fused",
        ("relu", "2"): f"relu  2    running      400/1000     0.5000     -           -       {holder_text(holder)} "
                       "(this machine)",
        ("relu", "3"): "relu  3    incomplete   650/1000     0.6000     -           -       last checkpoint mb 600; "
                       "walltime reached",
        ("relu", "4"): "relu  4    incomplete   250/1000     0.4000     -           -       process 999999 on n9 "
                       "ended without a word; last checkpoint mb 200",
        ("ABU", "1"): "ABU   1    complete     122/1000     0.0000     0.3000      plain   diverged at mb 123",
        ("ABU", "2"): "ABU   2    failed       0/1000       -          -           -       ValueError: boom",
        ("ABU", "3"): "ABU   3    not started  0/1000       -          -           -",
        ("ABU", "4"): "ABU   4    complete     1000/1000    0.7000     0.6900      -",
    }
    for key, line in expected.items():
        assert rows[key] == line
    assert lines[9] == "8 runs: 3 complete (1 diverged), 1 running, 2 incomplete, 1 failed, 1 not started"
    # 0.1 s/mb (relu 1); relu 2 keeps a worker for 60 s; the other worker takes relu 3 (40 s), relu 4 (80 s,
    # ends at 120 s); ABU 2 (100 s) takes the worker free at 60 s -> 160 s; ABU 3 the one free at 120 s -> 220 s
    assert lines[10] == "activation kernel: fused in 1 run(s); plain: DEEPNET_FUSED_ABU=0 in 1 run(s)"
    assert lines[11] == ("ETA 0:03:40 with 2 workers: 100.0 ms per minibatch measured on 1 complete run(s), 3800 "
                         "minibatches left, running runs keep their worker and the others take the first free one")
    assert len(lines) == 12


def test_status_rows_of_odd_and_older_runs(tmp_path):
    run = {n: sv.run_settings(sv.SETTINGS, {}, {"path_relative": str(tmp_path), "n_minibatches": 1000}, "exp", "a", n)
           for n in range(1, 7)}
    write_status(run[1], state="paused", mb="12", message="odd")
    write_record(str(tmp_path), "exp", "a", 2, mb_count_total=300, settings={"n_minibatches": 1000},
                 val_top1_hist=[0.4], checkpoints=[0, 250])   # older run, no status.json; stopped at mb 300
    os.makedirs(commands.run_paths(run[3])['run_dir'])
    open(commands.run_paths(run[3])['log'], "w").write("error: the data are missing\n")      # launched, never got going
    write_status(run[4], state="failed", message="")
    # diverged under an older suite, which did not test diverged runs: left to run (and then tested)
    write_status(run[5], state="diverged", mb=77, last_checkpoint_mb=60, message="diverged at minibatch 78 (loss nan)")
    write_record(str(tmp_path), "exp", "a", 6, mb_count_total=60, settings={"n_minibatches": 1000}, diverged=True,
                 diverged_at_mb=78, checkpoints=[0, 60])                       # the same, with no status.json
    rows = {n: status.run_status(run[n], "n1") for n in run}
    assert (rows[1]["state"], rows[1]["mb"]) == ("incomplete", 0)
    assert rows[1]["detail"] == "no checkpoint; odd; unknown state 'paused' in status.json"
    assert (rows[2]["state"], rows[2]["mb"], rows[2]["val"], rows[2]["resume_mb"]) == ("incomplete", 300, 0.4, 300)
    assert rows[2]["detail"] == "last checkpoint mb 300"
    assert rows[3]["state"] == "not started"
    assert rows[3]["detail"] == f"no status file; its log may say why: {commands.run_paths(run[3])['log']}"
    assert (rows[4]["state"], rows[4]["detail"]) == ("failed", "failed")
    assert (rows[5]["state"], rows[5]["resume_mb"]) == ("incomplete", 60)
    assert rows[5]["detail"] == ("diverged at minibatch 78 (loss nan), not tested; the sweep retrains it to there and "
                                 "tests the best checkpoint before it")
    assert rows[6]["state"] == "incomplete" and rows[6]["detail"].startswith("diverged at minibatch 78, not tested")
    assert [state_of(run[n]) for n in (5, 6)] == ["incomplete", "incomplete"]


def test_status_imports_nothing_heavy(tmp_path):
    code = ("import sys, deepnet_supervisor as sv; "
            f"sv.main(['--status', '--sweep', 'demo', '--set', 'path_relative={tmp_path}'], out=lambda line: None); "
            "print(sorted(m for m in ('tensorflow', 'numpy', 'deepnet_network', 'deepnet_task_cifar') "
            "if m in sys.modules))")
    result = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[]\n"
    assert not list(tmp_path.iterdir())


def test_list_sweeps_dry_run_and_the_analysis_import_no_tensorflow(tmp_path):
    """--dry-run times its steps in a child process (python -m deepnet.estimate): TensorFlow stays out of the
    supervisor, as it does for --list-sweeps and import deepnet_analysis."""
    code = ("import sys, deepnet_supervisor as sv; lines = []; sv.main(['--list-sweeps'], out=lines.append); "
            f"sv.main(['--dry-run', '--sweep', 'demo', '--specs', 'relu', '--runs', '1', '--set', "
            f"'path_relative={tmp_path}', '--set', 'minibatch_size=4', '--set', 'network=smcnLin'], out=lines.append); "
            "import deepnet_analysis; print(lines[-1]); print('tensorflow' in sys.modules)")
    result = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    estimate_line, imported = result.stdout.splitlines()[-2:]
    assert re.fullmatch(r"1 runs, 250 minibatches in all; estimated wall time \d+:\d\d:\d\d with --workers 1 on this "
                        r"machine \(per training step: smcnLin cifar10 1 function \d+ ms\)", estimate_line), estimate_line
    assert imported == "False"
    assert not list(tmp_path.iterdir())


def test_status_eta_without_timings_and_when_nothing_is_left():
    row = {"spec": "a", "run": 1, "mb": 0, "n": 100, "val": None, "test": None, "seconds": None, "resume_mb": 0,
           "detail": ""}
    assert status.status_eta([dict(row, state="not started")], 1) == \
        "ETA unknown: no run has recorded its training time yet"
    assert status.status_eta([dict(row, state="complete"), dict(row, state="complete")], 1) == "nothing left to run"
    unfinished = dict(row, state="incomplete", mb=50, resume_mb=50, seconds=5.0)
    assert status.status_eta([unfinished], 1).startswith("ETA 0:00:05 with 1 workers: 100.0 ms per minibatch "
                                                     "measured on 1 unfinished run(s) so far, 50 minibatches left")
    running = [dict(unfinished, state="running", n=150, mb=50)] * 3
    assert status.status_eta(running, 1).startswith("ETA 0:00:10 with 3 workers (one per running run; --workers 1): ")
    assert status.on_which_machine("process 5 on n2", "n1") == "process 5 on n2 (another machine)"


# ---------------------------------------------------------------- ETA with several workers

def test_finish_time_models_the_worker_slots():
    assert status.finish_time([], [60, 60], 2) == 60                     # two runs starting together end together
    assert status.finish_time([115], [115], 2) == 115                    # the demo sweep's [2/4]: not 2 x 115
    assert status.finish_time([], [10, 10, 10], 2) == 20
    assert status.finish_time([5], [10, 10], 1) == 25
    assert status.finish_time([30, 5], [10], 2) == 30
    assert status.finish_time([30, 20, 5], [10], 1) == 30                # more running runs than workers
    assert status.finish_time([], [], 3) == 0


def test_pool_eta_after_the_last_runs_start_together(tmp_path):
    runs = [sv.run_settings(sv.SETTINGS, {}, {"path_relative": str(tmp_path)}, "exp", "a", n) for n in (1, 2, 3, 4)]
    pool = local.LocalPool(runs[3:], 2)
    pool.durations = [115.0, 115.0]
    pool.running = {object(): (runs[2], None, time.monotonic())}   # run 3 has just started, run 4 waits
    assert 114 <= pool._eta() <= 115


# ---------------------------------------------------------------- data

def test_missing_data_falls_back_to_synthetic_with_one_line(tmp_path):
    import deepnet_task_cifar_preprocessing as prep
    settings = dict(sv.SETTINGS, path_relative=str(tmp_path))
    with pytest.raises(sv.UserError, match="download or preprocessing failed"):
        local.ensure_data(settings, synthetic_fallback=False, out=lambda line: None)
    lines = []
    local.ensure_data(settings, synthetic_fallback=True, out=lines.append)
    assert sum("download of cifar10 failed" in line and "synthetic" in line for line in lines) == 1
    assert all(os.path.isfile(p) for p in prep.output_paths(str(tmp_path), "cifar10", "ztrans"))
    lines = []
    local.ensure_data(settings, synthetic_fallback=True, out=lines.append)
    assert len(lines) == 1 and lines[0].startswith("note:") and "synthetic" in lines[0]


# ---------------------------------------------------------------- real sweeps

TINY = ["--set", "network=smcnLin", "--set", "minibatch_size=16", "--set", "n_minibatches=24", "--set", "val_every=4",
        "--set", "epochs_between_checkpoints=1", "--set", "safe_af_ws_n=3", "--set", "safe_all_ws_n=1",
        "--set", "create_lc_on_the_fly=False"]


def tiny_synthetic_root(path):
    import deepnet_task_cifar_preprocessing as prep
    root = str(path)
    prep.write_synthetic_raw(root, task="cifar10", n_train=320, n_test=80, seed=0)
    prep.preprocess_task(root, "cifar10", ["ztrans"])
    return root


def complete_runs_analysed(exp):
    """spec -> complete runs the analysis judged: those in its table plus those it excluded as bad runs
    (test accuracy in (0, 0.3), the original's rule; these tiny runs often stay at chance level)."""
    def rows(name):
        lines = open(os.path.join(exp, "0_analysis", name)).read().splitlines()
        return [dict(zip(lines[0].split(";"), line.split(";"))) for line in lines[1:]]
    counts = {row["spec_name"]: int(row["n_runs"]) for row in rows("main_performance_analysis.csv")}
    for row in rows("excluded_runs.csv"):
        if row["category"] == "bad_test_acc":
            counts[row["spec_name"]] = counts.get(row["spec_name"], 0) + 1
    return counts


def test_real_local_sweep(tmp_path):
    root = tiny_synthetic_root(tmp_path)
    args = ["--sweep", "demo", "--experiment", "tiny", "--workers", "2", "--set", f"path_relative={root}", *TINY]
    exp = os.path.join(root, "3_output_cifar", "tiny")
    orphan = os.path.join(exp, "ABU", "run_2", "run_info_tiny_ABU_run_2.txt")
    os.makedirs(os.path.dirname(orphan))
    open(orphan, "w").write("left over\n")                       # deepnet_main refuses this run: a failure
    first = run_supervisor(args)
    assert first.returncode == 1, first.stdout + first.stderr
    progress = [line for line in first.stdout.splitlines() if line.startswith("[")]
    assert len(progress) == 4
    failed = [line for line in progress if "FAILED" in line]
    assert len(failed) == 1 and " ABU run 2: FAILED (exit status 2), log: " in failed[0]
    assert f"log: {os.path.join(exp, 'ABU', 'run_2', 'log_ABU_run_2.txt')} in " in failed[0]
    assert "failures 1" in progress[-1]
    for spec, run in (("relu", 1), ("relu", 2), ("ABU", 1)):
        record = load_record(root, "tiny", spec, run)
        assert record["test_completed"] and record["settings"]["network"] == "smcnLin"
        assert record["settings"]["n_minibatches"] == 24 and len(record["train_top1_hist"]) == 24
        log = open(os.path.join(exp, spec, f"run_{run}", f"log_{spec}_run_{run}.txt")).read()
        assert log.count("deepnet_supervisor:") == 1 and f"{spec}/run {run}: test of the model of minibatch" in log
    assert load_record(root, "tiny", "ABU", 1)["settings"]["af_set"] == "5_blend5_swish"
    assert complete_runs_analysed(exp) == {"ABU": 1, "relu": 2}
    assert "ABU run 2: no recorder file" in first.stdout          # the analysis names the missing run

    os.remove(orphan)
    second = run_supervisor(args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "3 of 4 runs already complete: skipped" in second.stdout
    assert [line.split("]")[0] for line in second.stdout.splitlines() if line.startswith("[")] == ["[1/1"]
    assert load_record(root, "tiny", "ABU", 2)["test_completed"]
    assert complete_runs_analysed(exp) == {"ABU": 2, "relu": 2}
    table = open(os.path.join(exp, "0_analysis", "main_performance_analysis.csv")).read()
    # tests against the reference when it has an analysed (not chance-level) run; the report in any case
    assert os.path.isfile(os.path.join(exp, "0_analysis", "significance.csv")) == ("\nrelu;" in table)
    assert os.path.isfile(os.path.join(exp, "0_analysis", "report.html"))

    began = time.time()
    third = run_supervisor([*args, "--no-analysis"])
    assert third.returncode == 0 and "4 of 4 runs already complete: skipped" in third.stdout
    assert not any(line.startswith("[") for line in third.stdout.splitlines())
    assert time.time() - began < 60
    for spec, run in (("relu", 1), ("ABU", 2)):
        log = open(os.path.join(exp, spec, f"run_{run}", f"log_{spec}_run_{run}.txt")).read()
        assert log.count("deepnet_supervisor:") == (2 if (spec, run) == ("ABU", 2) else 1)


def test_a_sweep_without_a_compiler_says_so_once_up_front(tmp_path):
    root = tiny_synthetic_root(tmp_path / "root")
    env = dict(os.environ, CXX=str(tmp_path / "no-g++"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    env.pop("DEEPNET_FUSED_ABU", None)
    args = ["--sweep", "demo", "--experiment", "nocxx", "--specs", "ABU", "--runs", "1",
            "--set", f"path_relative={root}", *TINY, "--set", "n_minibatches=8", "--no-analysis"]
    result = run_supervisor(args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    warnings = [i for i, line in enumerate(lines) if "activation kernel" in line]
    assert len(warnings) == 1 and lines[warnings[0]].startswith(
        "warning: activation kernel plain: compiling deepnet_abu_op.cc failed: no C++ compiler: ")
    assert "ABU runs will take about 2x as long" in lines[warnings[0]]
    assert warnings[0] < next(i for i, line in enumerate(lines) if line.startswith("running 1 run(s)"))
    settings = sv.run_settings(sv.SETTINGS, {}, {"path_relative": root}, "nocxx", "ABU", 1)
    status = json.load(open(commands.run_paths(settings)['status']))
    assert status["state"] == "complete" and status["activation_kernel"].startswith(
        "plain: compiling deepnet_abu_op.cc failed: no C++ compiler")
    shown = run_supervisor(["--status", *args], env=env)
    assert f"activation kernel: {status['activation_kernel']} in 1 run(s)" in shown.stdout.splitlines()
    row = next(line for line in shown.stdout.splitlines() if line.startswith("ABU "))
    assert row.split()[:7] == ["ABU", "1", "complete", "8/8", row.split()[4], row.split()[5], "plain"]
