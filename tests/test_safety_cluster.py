"""Safe on a shared cluster: the supervisor's input and the cluster backends.

Nothing a user types runs as code (the task list is data read by python -m deepnet.cluster; what stays in a job
script or a scheduler directive is quoted for it or refused), names and paths pass deepnet/names.py's rule in
every mode, run selections are bounded before any list is built, impossible minibatch sizes are refused and a
full disk is warned about before anything is written, and job scripts respect the umask.
"""
import glob
import json
import os
import resource
import shlex
import subprocess
import sys
from types import SimpleNamespace

import pytest

import deepnet_supervisor as sv
from conftest import write_tiny_data
from deepnet import architectures, commands, disk, local
from deepnet_util import UserError, save_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
# A folder name a shell would act on: command substitutions (of $MARK, so that nothing could land in the repository),
# quotes, a comment, a separator, a glob, SLURM's % and a space.
HOSTILE = "a b $(touch $MARK) `touch $MARK` 'q' \"dq\" ; # %x *"
# Stands in for python on a node: the job's entry point (-m deepnet.cluster) runs in the real python; a run writes
# its arguments as one JSON line.
FAKE_PYTHON = """#!{py}
import json, os, sys
if sys.argv[1:2] == ["-m"]:
    os.execv({py!r}, [{py!r}, *sys.argv[1:]])
print("argv " + json.dumps(sys.argv[1:]))
"""


def fake_python(folder):
    path = os.path.join(folder, "python")
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as handle:
        handle.write(FAKE_PYTHON.format(py=PY))
    os.chmod(path, 0o755)
    return path


def run_supervisor(args, timeout=300, **kwargs):
    return subprocess.run([PY, "deepnet_supervisor.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def files_under(path):
    return sorted(os.path.relpath(os.path.join(folder, name), path)
                  for folder, _, names in os.walk(path) for name in names)


def assert_one_line_exit_2(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def sbatch_arguments(line):
    """The arguments sbatch reads from a '#SBATCH' line: a transcription of its reader (src/sbatch/opt.c,
    _get_argument): whitespace separates, '"' or "'" group, a backslash escapes the next character, an unquoted '#'
    ends the line."""
    arguments, text, pos = [], line[len("#SBATCH"):], 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return arguments
        argument, quote, escaped = "", None, False
        while pos < len(text) and (quote or not text[pos].isspace()):
            char, pos = text[pos], pos + 1
            if escaped:
                argument, escaped = argument + char, False
            elif char == "\\":
                escaped = True
            elif quote:
                if char == quote:
                    quote = None
                else:
                    argument += char
            elif char in "\"'":
                quote = char
            elif char == "#":
                pos = len(text)
                break
            else:
                argument += char
        assert quote is None, f"unmatched {quote} in {line}"
        arguments.append(argument)


@pytest.fixture
def cluster_settings(monkeypatch):
    """Every CLUSTER setting put back after the test."""
    for key, value in sv.CLUSTER.items():
        monkeypatch.setitem(sv.CLUSTER, key, value)
    return sv.CLUSTER


# ---------------------------------------------------------------- nothing a user types runs as code

def test_a_job_runs_its_task_with_every_argument_intact_however_hostile_the_path(
        tmp_path, cluster_settings, capsys):
    root = str(tmp_path / HOSTILE)
    cluster_settings["python"] = fake_python(root)                 # the interpreter's path is hostile too
    assert sv.main(["--backend", "slurm", "--dry-run", "--sweep", "demo", "--specs", "relu", "--runs", "1-2",
                    "--experiment", "x", "--set", f"path_relative={root}"]) == 0
    jobs = os.path.join(root, "3_output_cifar", "x", "0_jobs")
    [script] = glob.glob(os.path.join(glob.escape(jobs), "*.sh"))
    assert f"submit it with: sbatch {shlex.quote(script)}" in capsys.readouterr().out
    lines = open(script).read().splitlines()
    [output] = [line for line in lines if line.startswith("#SBATCH --output")]
    assert sbatch_arguments(output) == ["--output=" + os.path.join(jobs.replace("%", "%%"), "slurm_%A_%a.out")]
    for line in lines:                                               # every directive is one argument
        if line.startswith("#SBATCH"):
            assert len(sbatch_arguments(line)) == 1, line
    marks = {"MARK": str(tmp_path / "ran_as_code")}
    result = subprocess.run(["bash", script], env=dict(os.environ, SLURM_ARRAY_TASK_ID="2", **marks),
                            capture_output=True, text=True, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    settings = sv.run_settings(sv.SETTINGS, {}, {"path_relative": root}, "x", "relu", 2)
    log = open(commands.run_paths(settings)["log"]).read().splitlines()
    assert log[0].startswith("=== ") and " task 2 on " in log[0]
    assert len(log) == 2 and log[1].startswith("argv ")
    argv = json.loads(log[1][len("argv "):])
    assert argv[0] == "deepnet_main.py"
    assert argv[argv.index("-path_relative") + 1] == root
    assert argv[argv.index("-run") + 1] == "2" and argv[argv.index("-spec_name") + 1] == "relu"
    assert not os.path.exists(marks["MARK"])                       # no part of the path ran
    run_1 = sv.run_settings(sv.SETTINGS, {}, {"path_relative": root}, "x", "relu", 1)
    assert not os.path.exists(commands.run_paths(run_1)["log"])    # task 2 ran task 2 only


def test_the_task_entry_point_passes_any_argument_as_data(tmp_path):
    recorder = fake_python(str(tmp_path / "bin"))
    hostile = ["x\ny", "a\tb", "$(touch $MARK)", "`touch $MARK`", "'", '"', "", "; touch $MARK", "#", "\\", "é"]
    log = str(tmp_path / "logs" / "log.txt")
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"spec": "s", "run": 1, "log": str(tmp_path / "other.txt"), "argv": [recorder, "1"]})
                     + "\n" + json.dumps({"spec": "s", "run": 2, "log": log, "argv": [recorder, *hostile]}) + "\n")
    mark = str(tmp_path / "ran_as_code")
    result = subprocess.run([PY, "-m", "deepnet.cluster", str(tasks), "2"], cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, MARK=mark))
    assert result.returncode == 0 and result.stdout == result.stderr == "", result.stderr
    lines = open(log).read().splitlines()
    assert lines[0].startswith("=== ") and " task 2 on " in lines[0]
    assert json.loads(lines[-1][len("argv "):]) == hostile
    assert not os.path.exists(mark) and not os.path.exists(tmp_path / "other.txt")


@pytest.mark.parametrize("task_id, message", [("0", "task id '0'"), ("x", "task id 'x'"), ("3", "not task 3"),
                                              ("2", "line 2 is not a task")])
def test_the_task_entry_point_refuses_what_is_not_a_task_in_one_line(tmp_path, task_id, message):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"log": str(tmp_path / "log.txt"), "argv": ["true"]}) + "\n"
                     + json.dumps({"log": str(tmp_path / "log.txt"), "argv": "echo hi"}) + "\n")
    result = subprocess.run([PY, "-m", "deepnet.cluster", str(tasks), task_id], cwd=REPO, capture_output=True,
                            text=True)
    assert_one_line_exit_2(result, message)
    assert files_under(tmp_path) == ["tasks.jsonl"]


# ---------------------------------------------------------------- names and paths: one rule, every mode

BAD_VALUES = [
    (["--set", "path_relative={root}/a\nb"], "--set path_relative="),
    (["--set", "path_relative={root}/a\tb"], "--set path_relative="),
    (["--set", "load_af_weights_from=x\n\ty"], "--set load_af_weights_from="),
    (["--set", "load_af_weights_experiment=../elsewhere"], "--set load_af_weights_experiment=../elsewhere"),
    (["--set", "reference=a\rb"], "--set reference="),
    (["--set", "reference=../x"], "--set reference=../x"),
    (["--experiment", "../../elsewhere"], "--experiment '../../elsewhere'"),
    (["--experiment", "a\nb"], "--experiment 'a\\nb'"),
    (["--runs", "1\n2"], "--runs '1\\n2'"),
    (["--specs", "relu\nx"], "--specs: unknown spec(s) 'relu\\nx'"),
]


@pytest.mark.parametrize("mode", [["--backend", "slurm", "--dry-run"], ["--backend", "sge", "--dry-run"],
                                  ["--status"], ["--dry-run"]])
@pytest.mark.parametrize("args, message", BAD_VALUES)
def test_names_and_paths_that_break_the_rule_are_refused_in_one_line_in_every_mode(tmp_path, mode, args, message):
    root = tmp_path / "root"
    root.mkdir()
    args = [arg.replace("{root}", str(root)) for arg in args]
    result = run_supervisor([*mode, "--sweep", "demo", "--set", f"path_relative={root}", *args])
    assert_one_line_exit_2(result, message)
    assert files_under(tmp_path) == []


def test_a_nul_in_a_path_is_refused_naming_the_setting():    # no command line can carry one: in the process
    with pytest.raises(UserError, match=r"--set path_relative='a\\x00b': must not contain control characters"):
        sv.parse_overrides(["path_relative=a\x00b"])


def test_status_reads_no_experiment_outside_the_project(tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "elsewhere" / "relu" / "run_1"
    outside.mkdir(parents=True)
    save_json(str(outside / "status.json"), {"state": "complete"})
    result = run_supervisor(["--status", "--sweep", "demo", "--experiment", "../../elsewhere",
                             "--set", f"path_relative={root}"])
    assert_one_line_exit_2(result, "--experiment '../../elsewhere': must be")


def test_a_sweep_s_own_names_and_paths_follow_the_rule(tmp_path, monkeypatch):
    demo = sv.SWEEPS["demo"]
    monkeypatch.setitem(sv.SWEEPS, "bad", dict(demo, specs={"re lu": demo["specs"]["relu"]}))
    with pytest.raises(UserError, match=r"--sweep bad: -spec_name 're lu': must be"):
        sv.main(["--status", "--sweep", "bad", "--set", f"path_relative={tmp_path}"])
    monkeypatch.setitem(sv.SWEEPS, "bad", dict(demo, experiment="0_analysis"))
    with pytest.raises(UserError, match=r"--sweep bad: -experiment_name '0_analysis': must not start with '0_'"):
        sv.main(["--status", "--sweep", "bad", "--set", f"path_relative={tmp_path}"])
    monkeypatch.setitem(sv.SWEEPS, "bad", dict(demo, settings=dict(demo["settings"], path_relative="a\nb")))
    with pytest.raises(UserError, match=r"--sweep bad: -path_relative 'a\\nb': must not contain control"):
        sv.main(["--backend", "slurm", "--dry-run", "--sweep", "bad"])
    assert files_under(tmp_path) == []


# ---------------------------------------------------------------- directives: quoted for the scheduler, or refused

@pytest.mark.parametrize("backend, folder, message", [
    ("sge", "with space", "SGE's '#$ -o' line cannot carry ' '"),
    ("sge", "dollar$HOME", "cannot carry '$'"),
    ("sge", "quote'd", "cannot carry \"'\""),
    ("slurm", "back\\slash", "sbatch reads a backslash in --output"),
])
def test_output_folders_a_scheduler_cannot_carry_are_refused_before_anything_is_written(
        tmp_path, backend, folder, message):
    root = tmp_path / folder
    result = run_supervisor(["--backend", backend, "--dry-run", "--sweep", "demo", "--set", f"path_relative={root}"])
    assert_one_line_exit_2(result, f"--backend {backend}: the jobs' output folder", message)
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("key, value, message", [
    ("slurm_extra", ["--gres=gpu:1\ntouch /tmp/x"], "must not contain control characters"),
    ("sge_extra", ["-l gpu=1\r"], "must not contain control characters"),
    ("mem", "16G\n#SBATCH --wrap=x", "must be a size like 16G"),
    ("cpus", "4; touch x", "must be a whole number >= 1"),
    ("cpus", 0, "must be a whole number >= 1"),
    ("time_minutes", 1.5, "must be a whole number >= 1"),
    ("max_parallel", -1, "must be a whole number >= 0"),
    ("slurm_partition", "short --wrap=x", "must be '' or partition names"),
    ("sge_queue", "all.q -b y", "must be '' or a queue list"),
    ("sge_parallel_env", "smp 4", "must be a parallel environment's name"),
    ("python", "/usr/bin/python\nrm", "must not contain control characters"),
])
def test_cluster_settings_are_checked_before_anything_is_written(tmp_path, cluster_settings, key, value, message):
    cluster_settings[key] = value
    for backend in ("slurm", "sge"):
        with pytest.raises(UserError, match=rf"CLUSTER\['{key}'\] .*: {message}"):
            sv.main(["--backend", backend, "--dry-run", "--sweep", "demo", "--set", f"path_relative={tmp_path}"])
    assert files_under(tmp_path) == []


def test_extra_directive_lines_are_kept_as_written(tmp_path, cluster_settings):
    cluster_settings["slurm_extra"] = ["--gres=gpu:1  # one GPU", '--comment="a b"']
    assert sv.main(["--backend", "slurm", "--dry-run", "--sweep", "demo", "--set", f"path_relative={tmp_path}"]) == 0
    [script] = glob.glob(str(tmp_path / "3_output_cifar" / "*" / "0_jobs" / "*.sh"))
    lines = open(script).read().splitlines()
    assert "#SBATCH --gres=gpu:1  # one GPU" in lines and '#SBATCH --comment="a b"' in lines


@pytest.mark.parametrize("umask, script_mode, file_mode", [(0o077, 0o700, 0o600), (0o022, 0o755, 0o644),
                                                           (0o002, 0o775, 0o664)])
def test_job_scripts_and_task_lists_respect_the_umask(tmp_path, umask, script_mode, file_mode):
    result = run_supervisor(["--backend", "sge", "--dry-run", "--sweep", "demo", "--set", f"path_relative={tmp_path}"],
                            preexec_fn=lambda: os.umask(umask))
    assert result.returncode == 0, result.stderr
    [script] = glob.glob(str(tmp_path / "3_output_cifar" / "*" / "0_jobs" / "*.sh"))
    [tasks] = glob.glob(str(tmp_path / "3_output_cifar" / "*" / "0_jobs" / "*_tasks.jsonl"))
    assert os.stat(script).st_mode & 0o777 == script_mode
    assert os.stat(tasks).st_mode & 0o777 == file_mode
    assert os.stat(os.path.dirname(script)).st_mode & 0o777 == 0o777 & ~umask


# ---------------------------------------------------------------- run selections: bounded before they are built

def test_a_huge_run_selection_is_one_line_not_a_memory_kill(tmp_path):
    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    for args in (["--runs", "1-1000000000"], ["--status", "--runs", "0-1000000000000000000000"],
                 ["--runs", "1-600"]):                               # 17 specs x 600 runs = 10,200
        result = run_supervisor([*args, "--dry-run", "--set", f"path_relative={tmp_path}"], preexec_fn=limit_memory,
                                timeout=60)
        assert_one_line_exit_2(result, "more than the 10,000 one sweep may hold")
    assert files_under(tmp_path) == []
    assert "at most 10000 runs in all" in " ".join(run_supervisor(["--help"]).stdout.split())


def test_run_ranges_are_counted_arithmetically_and_bad_ones_stay_refused():
    assert sv.parse_runs("1-10000") == list(range(1, 10001))
    assert sv.parse_runs("3,1-2,2") == [1, 2, 3]
    for text in ("5-2", "-3", "1--3", "1-", "x"):
        with pytest.raises(UserError, match="--runs"):
            sv.parse_runs(text)
    with pytest.raises(UserError, match="10,001 run numbers"):
        sv.parse_runs("0-10000")


# ---------------------------------------------------------------- preflight: what can be checked before writing

def test_a_minibatch_larger_than_the_training_set_is_refused_before_any_job_is_written(tmp_path):
    root = write_tiny_data(str(tmp_path / "root"))                   # 320 training images
    before = files_under(root)
    for backend in ("slurm", "sge"):
        result = run_supervisor(["--backend", backend, "--dry-run", "--sweep", "demo", "--set", f"path_relative={root}",
                                 "--set", "minibatch_size=400"])
        assert_one_line_exit_2(result, "-minibatch_size 400: larger than the 0 training images left of 320 after "
                                       "a validation split of 400 (at least one minibatch)")
    result = run_supervisor(["--sweep", "demo", "--specs", "relu", "--runs", "1", "--no-analysis",
                             "--set", f"path_relative={root}", "--set", "minibatch_size=200"])
    assert_one_line_exit_2(result, "-minibatch_size 200: larger than the 120 training images left of 320 after a "
                                   "validation split of 200 (at least one minibatch)")
    assert files_under(root) == before


def test_the_training_set_size_comes_from_the_sidecar_else_from_the_file(tmp_path, monkeypatch):
    from deepnet import data, datasets
    root = write_tiny_data(str(tmp_path))
    settings = dict(sv.SETTINGS, path_relative=root, minibatch_size=100)
    assert local.training_images(settings) == 320                   # the original's pickles have no sidecar
    train, _ = datasets.output_paths(root, "cifar10", "ztrans")
    save_json(datasets.sidecar_path(train), {"images_shape": [50000, 32, 32, 3]})
    monkeypatch.setattr(data, "load_dataset", lambda *args: pytest.fail("loaded the data despite its sidecar"))
    assert local.training_images(settings) == 50000
    local.check_minibatch_sizes([dict(settings, minibatch_size=1000)])   # 48,000 left after a split of 2,000
    with pytest.raises(UserError, match="-minibatch_size 60000: larger than"):
        local.check_minibatch_sizes([dict(settings, minibatch_size=60000)])
    lines = []
    local.check_minibatch_sizes([dict(settings, path_relative=str(tmp_path / "none"))], lines.append)
    assert len(lines) == 1 and lines[0].startswith("note: no preprocessed cifar10 (ztrans)")


def test_a_sweep_that_may_not_fit_on_the_disk_is_warned_about(tmp_path, monkeypatch, capsys):
    free = {"bytes": 10 ** 9}
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: SimpleNamespace(free=free["bytes"]))
    args = ["--backend", "slurm", "--dry-run", "--sweep", "paper", "--set", f"path_relative={tmp_path}"]
    assert sv.main(args) == 0
    output = capsys.readouterr().out.splitlines()
    [line] = [line for line in output if line.startswith("warning:")]
    assert line.startswith(f"warning: {tmp_path}: 1.0 GB free, but the 510 run(s) to start may write about ")
    assert output.index(line) < len(output) - 1 and output[-1].startswith("wrote ")   # before the job is written
    needed = float(line.split("write about ")[1].split(" GB")[0].replace(",", ""))
    assert 100 < needed < 500                                        # ~0.45 GB per 60,000-minibatch smcn run
    free["bytes"] = 10 ** 15
    assert sv.main(args) == 0
    assert "warning:" not in capsys.readouterr().out


def test_parameter_counts_by_hand():
    # smcn: conv 5x5x3x64, 3x3x64x64, 1x1x64x64, 5x5x64x64 (+ biases), two 3/2 poolings 32 -> 16 -> 8, then
    # dense 8*8*64 -> 384 -> 192 -> 10
    smcn = (5 * 5 * 3 * 64 + 64) + (9 * 64 * 64 + 64) + (64 * 64 + 64) + (25 * 64 * 64 + 64) \
        + (8 * 8 * 64 * 384 + 384) + (384 * 192 + 192) + (192 * 10 + 10)
    assert architectures.n_trainable_weights("smcn", 10) == smcn == 1797514
    assert architectures.n_trainable_weights("smcnLin", 10) == smcn     # 2/2 average pooling: the same sizes
    assert architectures.n_trainable_weights("smcnDeep", 10) == smcn + 2 * (64 * 64 + 64 + 25 * 64 * 64 + 64)
    assert architectures.n_trainable_weights("smcn", 100) == smcn + 192 * 90 + 90
