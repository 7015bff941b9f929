"""Safety of the data (issue #21): a preprocessed variant changes as a whole, so a rebuild killed at any moment
leaves the old set or the new one (which training accepts) and the next run tidies up; builds of one task wait for
each other; training, -mode test and the analysis refuse a training and a test file of different builds, naming
both; every loader ends in one line (pickles, status.json, sidecars)."""
import fcntl
import hashlib
import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
import deepnet_analysis
import deepnet_main
import deepnet_task_cifar_preprocessing as prep
from deepnet import data, datasets, report, results, run_folder
from deepnet_util import UserError, load_json_object, load_pickle, run_cli, save_pickle

PREPROCESSING = os.path.join(ROOT, "deepnet_task_cifar_preprocessing.py")
HOOK = "DEEPNET_PREPROCESSING_STEP_HOOK"
TASK, VARIANT = "cifar10", "gcn_zca"
OLD_EPS, NEW_EPS = "0.5", "0.1"
REBUILD = ["--task", TASK, "--variant", VARIANT, "--zca-epsilon", NEW_EPS]


# ---------------------------------------------------------------- helpers

def documented_files(root, variant=VARIANT):
    """The variant's files where users and training find them: pickles, (gcn_zca) parameters, sidecars."""
    pickles = list(datasets.output_paths(root, TASK, variant))
    extra = [datasets.params_path(root, TASK)] if variant == "gcn_zca" else []
    return pickles + extra + [datasets.sidecar_path(path) for path in pickles]


def read_bytes(path):
    with open(path, "rb") as handle:
        return handle.read()


def write_plain(path, content):
    """content as a plain file at path (a symlink there is replaced, not written through)."""
    if os.path.lexists(path):
        os.remove(path)
    with open(path, "wb") as handle:
        handle.write(content)


def as_old_layout(root):
    """The layout before builds: plain files at the documented paths, sidecars that name no build."""
    for path in documented_files(root):
        content = read_bytes(path)
        if path.endswith(".json"):
            sidecar = json.loads(content)
            sidecar.pop("build", None)
            content = json.dumps(sidecar, indent=2, sort_keys=True).encode()
        write_plain(path, content)
    shutil.rmtree(os.path.join(datasets.task_dir(root, TASK), ".builds"), ignore_errors=True)


def set_state(root):
    """(a digest of each documented file as readers see it, sidecars without their build, None when missing;
    the builds the two sidecars name)."""
    contents, builds = [], []
    for path in documented_files(root):
        if not os.path.isfile(path):
            contents.append(None)
            continue
        content = read_bytes(path)
        if path.endswith(".json"):
            sidecar = json.loads(content)
            builds.append(sidecar.pop("build", None))
            content = json.dumps(sidecar, sort_keys=True).encode()
        contents.append(hashlib.sha256(content).hexdigest())
    return tuple(contents), tuple(builds)


def which_set(state, old, new):
    """'old' or 'new' when state is that whole set; fails otherwise."""
    contents, builds = state
    if contents == old[0] and builds == (None, None):
        return "old"
    assert contents == new[0] and len(builds) == 2 and builds[0] == builds[1] is not None, \
        f"neither the whole old set nor the whole new one: {state}"
    return "new"


def accepted_by_training(root):
    """The builds training records for the pair at the documented paths (data.load_pair: UserError if refused)."""
    train, test = datasets.output_paths(root, TASK, VARIANT)
    _, _, fingerprint = data.load_pair(train, test, 10, root)
    assert fingerprint["train"]["images"] == 40 and fingerprint["test"]["images"] == 10
    return fingerprint["train"]["build"], fingerprint["test"]["build"]


def leftovers(root):
    """What besides the lock, the switch, the current build and the documented files lies in the data folder."""
    builds = os.path.join(datasets.task_dir(root, TASK), ".builds")
    current = os.readlink(os.path.join(builds, VARIANT))
    found = sorted(set(os.listdir(builds)) - {".lock", VARIANT, current})
    for folder in {os.path.dirname(path) for path in documented_files(root)}:
        found += sorted(set(os.listdir(folder)) - {os.path.basename(path) for path in documented_files(root)})
    return found


def preprocess(root, *args, hook=None):
    """The preprocessing script in a subprocess (with the step hook if given)."""
    env = dict(os.environ, **({HOOK: hook} if hook else {}))
    return subprocess.run([sys.executable, PREPROCESSING, "--root", root, *args], capture_output=True, text=True,
                          env=env, timeout=900)


def snapshot(root):
    """{path: (kind, size, mtime)} of everything under root (links not followed)."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for path in [os.path.join(folder, name) for name in dirs + files]:
            info = os.lstat(path)
            state[path] = (stat.S_IFMT(info.st_mode), info.st_size, info.st_mtime_ns)
    return state


def run_argv(root, preprocessing, *extra):
    """deepnet_main flags of a tiny run on root's data."""
    return ["-path_relative", root, "-experiment_name", "exp", "-spec_name", "spec", "-run", "1",
            "-network", "smcnLin", "-minibatch_size", "16", "-n_minibatches", "4", "-val_every", "2",
            "-epochs_between_checkpoints", "1", "-safe_af_ws_n", "2", "-safe_all_ws_n", "1",
            "-create_lc_on_the_fly", "False", "-preprocessing", preprocessing, *extra]


def cli(argv, capsys):
    """deepnet_main through run_cli: (exit status, stderr lines)."""
    capsys.readouterr()
    try:
        code = run_cli(deepnet_main.main, argv) or 0
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err.strip().splitlines()


# ---------------------------------------------------------------- a gcn_zca rebuild, stopped or killed at every step

@pytest.fixture(scope="module")
def old_root(tmp_path_factory):
    """Synthetic CIFAR-10 preprocessed as gcn_zca with --zca-epsilon 0.5, in the layout before builds."""
    root = str(tmp_path_factory.mktemp("old"))
    prep.write_synthetic_raw(root, TASK, n_train=40, n_test=10, seed=2)
    result = preprocess(root, "--task", TASK, "--variant", VARIANT, "--zca-epsilon", OLD_EPS)
    assert result.returncode == 0, result.stderr
    as_old_layout(root)
    return root


def fresh_copy(old_root, parent, name="root"):
    copy = os.path.join(str(parent), name)
    shutil.copytree(old_root, copy)
    return copy


def stopped_steps(root, args, at_each_stop):
    """Run the preprocessing with the step hook 'stop'; at each stop call at_each_stop(step name) while the
    process stands still, then continue it. Returns (the step names, the exit status)."""
    log = os.path.join(os.path.dirname(root), "stopped.log")
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, PREPROCESSING, "--root", root, *args], stdout=subprocess.DEVNULL,
                                stderr=err, env=dict(os.environ, **{HOOK: "stop"}))
    steps = []
    try:
        while True:
            _, status = os.waitpid(proc.pid, os.WUNTRACED)
            if not os.WIFSTOPPED(status):
                proc.returncode = os.waitstatus_to_exitcode(status)
                return steps, proc.returncode
            with open(log) as handle:
                names = [line.split(": ", 1)[1].strip() for line in handle if line.startswith("step ")]
            assert len(names) == len(steps) + 1, names
            steps.append(names[-1])
            at_each_stop(names[-1])
            os.kill(proc.pid, signal.SIGCONT)
    finally:
        if proc.returncode is None:
            proc.kill()
            os.waitpid(proc.pid, 0)
            proc.returncode = -signal.SIGKILL


@pytest.fixture(scope="module")
def stopped_rebuild(old_root, tmp_path_factory):
    """A gcn_zca rebuild with another --zca-epsilon, from the old layout, stopped after every step on disk: at
    each stop the set at the documented paths and the builds training records for it."""
    root = fresh_copy(old_root, tmp_path_factory.mktemp("stopped"))
    old = set_state(root)
    seen = []

    def look(step):
        try:
            seen.append((step, set_state(root), accepted_by_training(root)))
        except UserError as err:
            seen.append((step, set_state(root), f"refused: {err}"))

    steps, code = stopped_steps(root, REBUILD, look)
    return {"root": root, "steps": steps, "code": code, "seen": seen, "old": old, "new": set_state(root)}


def test_a_rebuild_shows_the_whole_old_or_the_whole_new_set_at_every_step(stopped_rebuild):
    old, new, seen = stopped_rebuild["old"], stopped_rebuild["new"], stopped_rebuild["seen"]
    assert stopped_rebuild["code"] == 0 and len(stopped_rebuild["steps"]) >= 12, stopped_rebuild["steps"]
    assert new[0] != old[0] and None not in new[0]
    sets = []
    for step, state, builds in seen:
        assert not str(builds).startswith("refused"), (step, builds)
        sets.append(which_set(state, old, new))
        assert builds == state[1], (step, builds, state)  # training records the set it sees
    first_new = sets.index("new")
    assert set(sets[:first_new]) == {"old"} and set(sets[first_new:]) == {"new"}, list(zip(stopped_rebuild["steps"],
                                                                                           sets))
    assert stopped_rebuild["steps"][first_new].startswith(f"switched {VARIANT} to ")  # one step changes it all
    with open(datasets.sidecar_path(datasets.output_paths(stopped_rebuild["root"], TASK, VARIANT)[0])) as handle:
        assert json.load(handle)["parameters"]["zca_eps"] == float(NEW_EPS)


def test_after_a_rebuild_the_documented_paths_lead_through_one_switch_and_nothing_is_left(stopped_rebuild):
    root = stopped_rebuild["root"]
    for path in documented_files(root):
        assert os.readlink(path) == os.path.join("..", ".builds", VARIANT, os.path.basename(path))
    assert leftovers(root) == []
    assert [step for step in stopped_rebuild["steps"] if step.startswith("removed ")], stopped_rebuild["steps"]


def step_number(steps, prefix, last=False):
    """The 1-based number of the first (or last) step whose name starts with prefix."""
    numbers = [number for number, name in enumerate(steps, 1) if name.startswith(prefix)]
    assert numbers, (prefix, steps)
    return numbers[-1] if last else numbers[0]


KILLS = {  # where the rebuild is killed: (step name prefix, the last such step?, the set it leaves)
    "in the move from the old layout": ("linked ", False, "old"),
    "after the new training pickle": ("wrote ", False, "old"),  # trained_after_a_kill: a run trains on what is left
    "after the switch, before the old build is removed": (f"switched {VARIANT} to ", True, "new"),
}
TRAINED_MOMENT = "after the new training pickle"


def kill_and_finish(root, steps, moment, between=lambda: None):
    """Kill a rebuild at a moment of KILLS, call between(), run it again to its end; returns what was seen: the set
    after the kill and after the rerun, the builds training accepted, the rerun's output, the leftovers."""
    prefix, last, _ = KILLS[moment]
    killed = preprocess(root, *REBUILD, hook=str(step_number(steps, prefix, last)))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    seen = {"killed": set_state(root), "accepted": accepted_by_training(root), "between": between()}
    again = preprocess(root, *REBUILD)
    assert again.returncode == 0, again.stderr
    return dict(seen, output=again.stdout, finished=set_state(root), leftovers=leftovers(root))


def assert_whole_set_then_finished(stopped_rebuild, seen, expected):
    old, new = stopped_rebuild["old"], stopped_rebuild["new"]
    assert which_set(seen["killed"], old, new) == expected
    assert seen["accepted"] == seen["killed"][1]
    assert ("kept cifar10 gcn_zca" if expected == "new" else "wrote cifar10 gcn_zca") in seen["output"]
    assert which_set(seen["finished"], old, new) == "new" and seen["leftovers"] == []


@pytest.mark.parametrize("moment", [moment for moment in KILLS if moment != TRAINED_MOMENT])
def test_a_rebuild_killed_leaves_a_whole_set_and_the_next_run_finishes_and_tidies_up(
        stopped_rebuild, old_root, tmp_path, moment):
    seen = kill_and_finish(fresh_copy(old_root, tmp_path), stopped_rebuild["steps"], moment)
    assert_whole_set_then_finished(stopped_rebuild, seen, KILLS[moment][2])


@pytest.fixture(scope="module")
def trained_after_a_kill(stopped_rebuild, old_root, tmp_path_factory):
    """A rebuild killed after its new training pickle, a tiny run trained on what it left, the rebuild run again to
    its end. Returns (root, what kill_and_finish saw, with the training's exit status and recorder)."""
    root = fresh_copy(old_root, tmp_path_factory.mktemp("trained"))

    def train():
        code = run_cli(deepnet_main.main, run_argv(root, VARIANT))
        return code, load_pickle(os.path.join(root, "3_output_cifar", "exp", "spec", "run_1", "record_spec_run_1.pkl"))

    return root, kill_and_finish(root, stopped_rebuild["steps"], TRAINED_MOMENT, train)


def test_a_rebuild_killed_after_its_training_pickle_leaves_the_old_set_and_the_next_run_finishes(
        stopped_rebuild, trained_after_a_kill):
    assert_whole_set_then_finished(stopped_rebuild, trained_after_a_kill[1], "old")


def test_training_accepts_the_set_a_killed_rebuild_leaves(trained_after_a_kill):
    code, record = trained_after_a_kill[1]["between"]
    assert code == 0 and record["test_completed"]
    assert record["data_fingerprint"]["train"]["parameters"]["zca_eps"] == float(OLD_EPS)
    assert record["data_fingerprint"]["test"]["parameters"]["zca_eps"] == float(OLD_EPS)


# ---------------------------------------------------------------- one build at a time

def hold_lock(root):
    """Take the task's preprocessing lock as another process would; returns the open lock file."""
    path = os.path.join(datasets.task_dir(root, TASK), ".builds", ".lock")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle = open(path, "a+")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.write("process 1 on elsewhere\n")
    handle.flush()
    return handle


def wait_for_text(path, text, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and text in open(path).read():
            return
        time.sleep(0.05)
    pytest.fail(f"{path} never said {text!r}")


def test_builds_of_one_task_wait_for_each_other_and_only_one_builds(tmp_path):
    root = str(tmp_path / "root")
    prep.write_synthetic_raw(root, TASK, n_train=40, n_test=10)
    lock = hold_lock(root)
    procs = []
    for number in range(2):
        log = str(tmp_path / f"out{number}")
        with open(log, "w") as out:
            procs.append((subprocess.Popen([sys.executable, PREPROCESSING, "--root", root, "--variant", "none"],
                                           stdout=out, stderr=subprocess.STDOUT), log))
    try:
        for _, log in procs:
            wait_for_text(log, "waiting for process 1 on elsewhere, which is preprocessing")
        assert not any(os.path.lexists(path) for path in documented_files(root, "none"))
    finally:
        lock.close()
    outputs = []
    for proc, log in procs:
        assert proc.wait(timeout=300) == 0
        outputs.append(open(log).read())
    assert sum("wrote cifar10 none" in text for text in outputs) == 1, outputs
    assert sum("kept cifar10 none: built meanwhile by another process" in text for text in outputs) == 1, outputs
    assert all(os.path.isfile(path) for path in documented_files(root, "none"))


# ---------------------------------------------------------------- a pair of two builds is refused

def write_sidecar(path, build):
    """A pickle of 40 images at path and a sidecar naming build (none at all for the string 'absent')."""
    save_pickle(path, {"images": np.zeros((40, 32, 32, 3), np.float32), "labels": np.arange(40) % 10})
    if build != "absent":
        with open(datasets.sidecar_path(path), "w") as handle:
            json.dump({"variant": "ztrans"} if build is None else {"variant": "ztrans", "build": build}, handle)


@pytest.mark.parametrize("train_build, test_build, accepted", [
    ("b1", "b1", True), (None, None, True), ("absent", "absent", True), ("absent", None, True),
    ("b1", "b2", False), ("b1", None, False), ("absent", "b2", False)])
def test_a_training_and_a_test_file_must_name_one_build(tmp_path, train_build, test_build, accepted):
    train, test = str(tmp_path / "train.pkl"), str(tmp_path / "test.pkl")
    write_sidecar(train, train_build)
    write_sidecar(test, test_build)
    if accepted:
        assert data.check_one_build(train, test) == (train_build if train_build not in ("absent", None) else None)
        data.load_pair(train, test, 10, str(tmp_path))
        return
    for check in (lambda: data.check_one_build(train, test), lambda: data.load_pair(train, test, 10, str(tmp_path))):
        with pytest.raises(UserError) as refused:
            check()
        message = str(refused.value)
        assert train in message and test in message and "not from one preprocessing build" in message
        assert len(message.splitlines()) == 1


@pytest.fixture(scope="module")
def two_ztrans_builds(tmp_path_factory):
    """Synthetic CIFAR-10 preprocessed as ztrans twice (--force); (root, the first build's test pickle and sidecar)."""
    root = str(tmp_path_factory.mktemp("ztrans"))
    prep.write_synthetic_raw(root, TASK, n_train=40, n_test=10, seed=4)
    assert preprocess(root, "--variant", "ztrans").returncode == 0
    test = datasets.output_paths(root, TASK, "ztrans")[1]
    first = read_bytes(test), read_bytes(datasets.sidecar_path(test))
    assert preprocess(root, "--variant", "ztrans", "--force").returncode == 0
    return root, first


def test_training_refuses_a_pair_of_two_builds_in_one_line_writing_nothing(two_ztrans_builds, tmp_path, capsys):
    root = str(tmp_path / "root")
    shutil.copytree(two_ztrans_builds[0], root, symlinks=True)
    train, test = datasets.output_paths(root, TASK, "ztrans")
    write_plain(test, two_ztrans_builds[1][0])  # the test set of the first build beside the training set of the second
    write_plain(datasets.sidecar_path(test), two_ztrans_builds[1][1])
    before = snapshot(root)
    code, errors = cli(run_argv(root, "ztrans"), capsys)
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: "), errors
    assert train in errors[0] and test in errors[0] and "not from one preprocessing build" in errors[0]
    assert snapshot(root) == before


@pytest.fixture(scope="module")
def trained_ztrans(two_ztrans_builds, tmp_path_factory):
    """A tiny run trained on the second ztrans build: (root, its recorder)."""
    root = os.path.join(str(tmp_path_factory.mktemp("trained_ztrans")), "root")
    shutil.copytree(two_ztrans_builds[0], root, symlinks=True)
    assert run_cli(deepnet_main.main, run_argv(root, "ztrans")) == 0
    return root, load_pickle(os.path.join(root, "3_output_cifar", "exp", "spec", "run_1", "record_spec_run_1.pkl"))


def test_mode_test_refuses_a_pair_of_two_builds(trained_ztrans, two_ztrans_builds, tmp_path, capsys):
    root = str(tmp_path / "root")
    shutil.copytree(trained_ztrans[0], root, symlinks=True)
    train, test = datasets.output_paths(root, TASK, "ztrans")
    write_plain(test, two_ztrans_builds[1][0])  # the test set of the first build beside the training set of the second
    write_plain(datasets.sidecar_path(test), two_ztrans_builds[1][1])
    before = snapshot(root)
    code, errors = cli(run_argv(root, "ztrans", "-mode", "test"), capsys)
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: "), errors
    assert train in errors[0] and test in errors[0] and "not from one preprocessing build" in errors[0]
    assert snapshot(root) == before


def test_the_analysis_refuses_a_run_trained_on_a_pair_of_two_builds(trained_ztrans, tmp_path):
    record = trained_ztrans[1]
    fingerprint = record["data_fingerprint"]
    mixed = dict(fingerprint, train=dict(fingerprint["train"], build="ztrans-1"),
                 test=dict(fingerprint["test"], build="ztrans-2"))
    exp = str(tmp_path / "3_output_cifar" / "mixed")
    path = results.recorder_path(exp, "relu", 1)
    os.makedirs(os.path.dirname(path))
    save_pickle(path, dict(record, spec_name="relu", run=1, data_fingerprint=mixed))
    with pytest.raises(UserError) as refused:
        deepnet_analysis.analyse_experiment(exp, out=lambda line: None)
    message = str(refused.value)
    assert path in message and fingerprint["train"]["file"] in message and fingerprint["test"]["file"] in message
    assert "not from one preprocessing build" in message and len(message.splitlines()) == 1
    assert not os.path.exists(os.path.join(exp, "0_analysis"))
    save_pickle(path, dict(record, spec_name="relu", run=1))  # one build: analysed
    deepnet_analysis.analyse_experiment(exp, out=lambda line: None)
    assert os.path.isdir(os.path.join(exp, "0_analysis"))


# ---------------------------------------------------------------- every loader ends in one line

def codec_pickle(codec):
    """A pickle that calls the allowed _codecs.encode('x', codec)."""
    text = [codec.encode("utf-8")]
    return (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00x" + b"X" + len(text[0]).to_bytes(4, "little") + text[0]
            + b"\x86R.")


def global_pickle(module, name):
    """A pickle that asks for the global module.name by STACK_GLOBAL (names may hold any character)."""
    return pickle.dumps("placeholder", protocol=4)[:2] + b"".join(
        b"\x8c" + bytes([len(part.encode())]) + part.encode() for part in (module, name)) + b"\x93."


@pytest.mark.parametrize("content", [codec_pickle("no-such-codec"), codec_pickle("no\nsuch\ncodec"),
                                     global_pickle("os\nx", "system"), global_pickle("posix", "sys\ntem")],
                         ids=["unknown codec", "codec with newlines", "module with a newline", "name with a newline"])
def test_a_pickle_that_makes_the_unpickler_fail_is_one_line_naming_the_file(tmp_path, content):
    path = str(tmp_path / "record_spec_run_1.pkl")
    with open(path, "wb") as handle:
        handle.write(content)
    for load in (load_pickle, lambda p: data.load_dataset(p, 10)):
        with pytest.raises(UserError) as refused:
            load(path)
        assert str(refused.value).startswith(f"{path}: ") and len(str(refused.value).splitlines()) == 1
    record, why = run_folder.read_record(path)  # the analysis and --status read recorders so
    assert record is None and why.startswith(f"{path}: ") and len(why.splitlines()) == 1


def test_training_on_a_pickle_with_an_unknown_codec_is_refused_in_one_line(tmp_path, capsys):
    root = str(tmp_path)
    train, test = datasets.output_paths(root, TASK, "ztrans")
    os.makedirs(os.path.dirname(train))
    write_plain(train, codec_pickle("no-such-codec"))
    write_sidecar(test, "absent")
    before = snapshot(root)
    code, errors = cli(run_argv(root, "ztrans"), capsys)
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"error: {train}: not a valid pickle"), errors
    assert snapshot(root) == before


def nested_json(depth):
    return '{"state": ' + "[" * depth + "]" * depth + "}"


@pytest.mark.parametrize("depth", [100000, 200])
def test_a_deeply_nested_status_json_reads_as_unreadable(tmp_path, depth):
    path = tmp_path / "status.json"
    path.write_text(nested_json(depth))
    assert load_json_object(str(path)) is None
    assert run_folder.read_status({"status": str(path)}) is None


@pytest.mark.parametrize("depth", [100000, 200])
def test_a_deeply_nested_sidecar_is_an_unreadable_sidecar_everywhere(tmp_path, depth, capsys):
    root = str(tmp_path)
    prep.write_synthetic_raw(root, TASK, n_train=20, n_test=10)
    assert prep.preprocess_task(root, TASK, "none")
    train = datasets.output_paths(root, TASK, "none")[0]
    sidecar = datasets.sidecar_path(train)
    write_plain(sidecar, nested_json(depth).encode())
    md5s = prep.raw_md5s(root, TASK)
    assert prep._output_state(root, TASK, "none", md5s, 0.0) == ("missing", "")
    assert data.build_of(train) is None
    images, labels = data.load_dataset(train, 10)
    assert data.dataset_fingerprint(train, images, labels, root)["parameters"] is None
    assert "unreadable" in report.sidecar_table(sidecar)
    capsys.readouterr()
    assert prep.preprocess_task(root, TASK, "none")  # rebuilt, not a traceback
    assert "wrote cifar10 none" in capsys.readouterr().out


def test_other_unreadable_json_reads_as_none(tmp_path):
    cases = {"bad utf-8": b'{"a": "\xff"}', "a list": b"[1, 2]", "huge integer": b'{"a": ' + b"9" * 5000 + b"}",
             "truncated": b'{"a": [1, 2'}
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        assert load_json_object(str(path)) is None, name
    assert load_json_object(str(tmp_path)) is None  # a folder


def test_the_supervisor_reads_a_sidecar_that_is_not_utf8_without_a_traceback(tmp_path):
    from deepnet import local
    import deepnet_supervisor as sv
    root = str(tmp_path)
    prep.write_synthetic_raw(root, TASK, n_train=20, n_test=10)
    assert prep.preprocess_task(root, TASK, "ztrans")
    sidecar = datasets.sidecar_path(datasets.output_paths(root, TASK, "ztrans")[0])
    write_plain(sidecar, read_bytes(sidecar).replace(b'"synthetic', b'"\xff synthetic'))
    lines = []
    local.ensure_data(dict(sv.SETTINGS, path_relative=root), synthetic_fallback=False, out=lines.append)
    assert len(lines) == 1 and lines[0].startswith("note:") and "synthetic" in lines[0]
