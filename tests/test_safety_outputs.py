"""Issue #21, the outputs' part: the analysis writes one set; files only where the suite means to write them;
group-shared experiments; text escaped for where it goes."""
import csv
import errno
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
import deepnet_analysis as da
import deepnet_util
import deepnet_supervisor as sv
from deepnet import figures, local, outputs, run_folder, status
from deepnet_util import RunError, RunLock, UserError, atomic_open, run_cli, save_text
from test_analysis import N_MB, fake_record, parse_report, write_record

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GROUP_UIDS = (61721, 61722)      # two users that share one group (only as root; unused ids are picked from here)
GROUP_GID = 61720
LAZY_IMPORTS = ("tensorboard.compat.proto.event_pb2", "tensorboard.plugins.hparams.summary_v2",
                "tensorboard.summary.writer.record_writer")   # what the analysis imports only when it writes


def snapshot(folder):
    """{relative path: bytes} of every file under folder (links as 'link -> target')."""
    found = {}
    for base, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(base, name)
            if os.path.islink(path):
                found[os.path.relpath(path, folder)] = f"link -> {os.readlink(path)}"
            elif os.path.isfile(path):
                with open(path, "rb") as handle:
                    found[os.path.relpath(path, folder)] = handle.read()
    return found


def light_record(spec, run, acc, es_mb, **changes):
    """A recorder without AF-weight and pre-activation histories (fewer plots: a quicker analysis)."""
    return fake_record(spec, run, acc, es_mb, "1_relu", "unrestricted", val_af_weights_hist=[],
                       val_preact_stats_hist=[], test_af_weights=None, **changes)


def small_experiment(exp, accs=((0.70, 0.72), (0.74, 0.73))):
    """relu and ABU, two complete runs each, with the given test accuracies."""
    for spec, values in (("relu", accs[0]), ("ABU", accs[1])):
        for run, acc in enumerate(values, 1):
            write_record(exp, light_record(spec, run, acc, 50))
    return exp


def quiet(line):
    pass


def staging_leftovers(exp):
    return glob.glob(os.path.join(exp, "0_analysis.tmp_*"))


# ---------------------------------------------------------------- the analysis writes one set

def test_a_failed_analysis_leaves_the_previous_set_complete_and_unchanged(tmp_path, monkeypatch):
    exp = small_experiment(str(tmp_path / "3_output_cifar" / "exp"))
    da.analyse_experiment(exp, out=quiet)
    before = snapshot(os.path.join(exp, "0_analysis"))
    assert {"report.html", "main_performance_analysis.csv", "significance.csv", "excluded_runs.csv"} <= set(before)
    write_record(exp, light_record("relu", 3, 0.60, 40))   # the next set differs
    written = []

    def full_disk(path, obj):  # the summary pickles come after the tables and plots
        written.append(path)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(da, "save_pickle", full_disk)
    with pytest.raises(OSError, match="No space left"):
        da.analyse_experiment(exp, out=quiet)
    assert written and snapshot(os.path.join(exp, "0_analysis")) == before
    assert staging_leftovers(exp) == []
    monkeypatch.undo()
    da.analyse_experiment(exp, out=quiet)
    rows = list(csv.DictReader(open(os.path.join(exp, "0_analysis", "main_performance_analysis.csv")),
                               delimiter=";"))
    assert {row["spec_name"]: row["n_runs"] for row in rows} == {"relu": "3", "ABU": "2"}


def fill(disk):
    """Fill the file system of disk to the last byte."""
    with open(os.path.join(disk, "filler"), "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
        except OSError as err:
            assert err.errno == errno.ENOSPC


def test_a_really_full_disk_leaves_the_previous_set_and_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    """As root, on a small tmpfs that fills up between the plots of the second analysis; otherwise the first
    plot's write fails with ENOSPC (the same path through the code)."""
    disk = str(tmp_path / "disk")
    os.makedirs(disk)
    mount = ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", disk]
    mounted = os.geteuid() == 0 and subprocess.run(mount).returncode == 0
    try:
        exp = small_experiment(os.path.join(disk, "3_output_cifar", "exp"))
        da.analyse_experiment(exp, out=quiet)
        before = snapshot(os.path.join(exp, "0_analysis"))
        write_record(exp, light_record("relu", 3, 0.60, 40))
        real_save = figures.save_figure
        calls = []

        def save_on_a_full_disk(fig, path):
            calls.append(path)
            if len(calls) == 3:
                if mounted:
                    fill(disk)
                else:
                    raise OSError(errno.ENOSPC, "No space left on device", path)
            return real_save(fig, path)
        monkeypatch.setattr(figures, "save_figure", save_on_a_full_disk)
        with pytest.raises(SystemExit) as stop:
            run_cli(lambda argv: da.analyse_experiment(exp, out=quiet))
        assert stop.value.code == 1
        errors = capsys.readouterr().err.splitlines()
        assert len(errors) == 1 and "No space left on device" in errors[0], errors
        assert errors[0].startswith(f"error: {os.path.join(exp, '0_analysis.tmp_')}"), errors
        assert snapshot(os.path.join(exp, "0_analysis")) == before
        assert staging_leftovers(exp) == []
    finally:
        if mounted:
            subprocess.run(["umount", disk], check=True)


def test_an_unknown_reference_is_exit_2_and_changes_nothing(tmp_path, capsys):
    exp = small_experiment(str(tmp_path / "3_output_cifar" / "exp"))
    da.analyse_experiment(exp, out=quiet)
    before = snapshot(exp)
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda argv: da.analyse_experiment(exp, reference="nosuch", out=quiet))
    assert stop.value.code == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == [f"error: -reference 'nosuch': no spec folder of that name in {exp} (its specs: ABU, relu)"]
    assert snapshot(exp) == before


def test_a_sweep_whose_reference_spec_was_not_selected_is_analysed_without_the_comparisons(tmp_path):
    exp = small_experiment(str(tmp_path / "3_output_cifar" / "exp"))
    lines = []
    result = da.analyse_experiment(exp, reference="smcn_adam_c10_relu", out=lines.append, reference_required=False)
    assert result["significance"] is None and os.path.isfile(result["report"])
    assert sorted(row["spec_name"] for row in result["performance"]) == ["ABU", "relu"]
    assert any("reference spec 'smcn_adam_c10_relu' has no analysed run" in line for line in lines)


def test_the_supervisor_refuses_a_reference_that_no_analysis_could_find_before_anything_is_written(tmp_path):
    root = str(tmp_path)
    args = ["--sweep", "demo", "--set", f"path_relative={root}", "--set", "reference=relu_typo"]
    with pytest.raises(UserError, match=r"^--set reference=relu_typo: neither a spec of sweep demo nor a spec "
                                        r"folder in .*demo_smcn_cifar10, so the analysis could compare nothing"):
        sv.main(args)
    assert os.listdir(root) == []
    assert sv.reference_problem(sv.parse_args(args[:4]), sv.plan(sv.parse_args(args[:4]))) is None


def test_no_complete_run_writes_nothing_and_names_the_categories(tmp_path):
    exp = str(tmp_path / "exp")
    write_record(exp, fake_record("relu", 1, 0.5, None, "1_relu", "unrestricted", test_completed=False))
    with pytest.raises(UserError, match=r"no complete run \(1 excluded: 1 incomplete; the lines above say why\)"):
        da.analyse_experiment(exp, out=quiet)
    assert sorted(os.listdir(exp)) == ["relu"]


def test_a_running_run_is_shown_as_running(tmp_path):
    exp = small_experiment(str(tmp_path / "3_output_cifar" / "exp"))
    write_record(exp, light_record("relu", 3, 0.5, None, test_completed=False, training_completed=False,
                                   mb_count_total=40))
    lines = []
    with RunLock(run_folder.folder_paths(exp, "relu", 3)["lock"]):
        result = da.analyse_experiment(exp, out=lines.append)
    holder = f"process {os.getpid()} on {os.uname().nodename}"
    rows = list(csv.DictReader(open(os.path.join(exp, "0_analysis", "excluded_runs.csv")), delimiter=";"))
    assert [(row["spec_name"], row["run"], row["category"]) for row in rows] == [("relu", "3", "running")]
    assert rows[0]["reason"] == f"running ({holder}): analyse again once it has ended"
    assert f"excluded: relu run 3: running ({holder}): analyse again once it has ended" in lines
    text, parser = parse_report(result["report"])
    assert parser.errors == []
    assert "Still running, so not analysed: relu run 3. Analyse again once they have ended." in text


def test_leftovers_of_a_killed_analysis_are_removed_by_the_next(tmp_path):
    exp = small_experiment(str(tmp_path / "3_output_cifar" / "exp"))
    os.makedirs(os.path.join(exp, "0_analysis.tmp_deadbeef"))
    open(os.path.join(exp, "0_analysis.tmp_deadbeef", "report.html"), "w").close()
    da.analyse_experiment(exp, out=quiet)
    assert staging_leftovers(exp) == []
    assert sorted(name for name in os.listdir(exp) if name.startswith("0_")) == [
        "0_analysis", "0_analysis.lock", "0_summaries"]


def test_one_analysis_of_an_experiment_writes_at_a_time(tmp_path):
    exp = small_experiment(str(tmp_path / "3_output_cifar" / "exp"))
    other = RunLock(os.path.join(exp, "0_analysis.lock"))
    other.acquire()
    lines = []

    def out(line):  # the other analysis ends when this one says it waits
        lines.append(line)
        if line.startswith("waiting for the analysis"):
            assert not os.path.exists(os.path.join(exp, "0_analysis"))
            other.release()
    da.analyse_experiment(exp, out=out)
    assert lines[0] == f"waiting for the analysis of {exp} by process {os.getpid()} on {os.uname().nodename} to end"
    assert os.path.isfile(os.path.join(exp, "0_analysis", "report.html"))


def test_where_folders_cannot_be_swapped_in_one_step_two_renames_and_one_line(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "which").write_text("a")
    (b / "which").write_text("b")
    assert deepnet_util.exchange(str(a), str(b))                  # ext4, xfs, btrfs, tmpfs: one step
    assert (a / "which").read_text() == "b" and (b / "which").read_text() == "a"
    exp = small_experiment(str(tmp_path / "3_output_cifar" / "exp"))
    da.analyse_experiment(exp, out=quiet)
    write_record(exp, light_record("relu", 3, 0.60, 40))
    monkeypatch.setattr(deepnet_util, "exchange", lambda a, b: False)   # as on NFS
    lines = []
    da.analyse_experiment(exp, out=lines.append)
    analysis_dir = os.path.join(exp, "0_analysis")
    assert lines.count("note: this file system cannot swap two folders in one step (renameat2 RENAME_EXCHANGE), "
                       f"so {analysis_dir} was replaced by two renames") == 1
    rows = list(csv.DictReader(open(os.path.join(analysis_dir, "main_performance_analysis.csv")), delimiter=";"))
    assert {row["spec_name"]: row["n_runs"] for row in rows} == {"relu": "3", "ABU": "2"}
    assert staging_leftovers(exp) == []


# ---------------------------------------------------------------- files only where the suite means to write them

def test_a_lock_that_is_a_symbolic_link_is_refused_and_what_it_points_to_untouched(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("precious\n")
    run_dir = tmp_path / "exp" / "relu" / "run_1"
    run_dir.mkdir(parents=True)
    lock = run_dir / ".lock"
    lock.symlink_to(precious)
    with pytest.raises(RunError, match=r"\.lock: is a symbolic link, not a lock file the suite made"):
        RunLock(str(lock)).acquire()
    assert precious.read_text() == "precious\n"
    assert run_folder.lock_holder({"lock": str(lock)}) is None       # cannot be read: not a lock of the suite
    dangling = tmp_path / "exp" / "relu" / "run_2" / ".lock"
    dangling.parent.mkdir()
    dangling.symlink_to(tmp_path / "created_through_the_link")
    assert run_folder.lock_holder({"lock": str(dangling)}) is None
    with pytest.raises(RunError):
        RunLock(str(dangling)).acquire()
    assert not (tmp_path / "created_through_the_link").exists()


def test_run_plots_use_unique_temporary_files_and_follow_no_link(tmp_path):
    record = fake_record("relu", 1, 0.7, 50, "1_relu", "unrestricted")
    precious = tmp_path / "precious.png"
    precious.write_bytes(b"precious")
    path = tmp_path / "learning_curves_relu_run_1.png"
    (tmp_path / f".tmp_{path.name}").symlink_to(precious)     # the fixed temporary name the plots had
    other = tmp_path / "early_stopping_analysis.png"
    other.symlink_to(precious)                                 # a link at the plot's own name is replaced
    outputs.plot_learning_curves(record, str(path))
    outputs.plot_early_stopping(record, [], str(other))
    assert precious.read_bytes() == b"precious"
    for plot in (path, other):
        assert not plot.is_symlink() and plot.read_bytes()[:8] == PNG_MAGIC


def test_the_supervisors_run_log_is_never_written_through_a_link(tmp_path, monkeypatch):
    settings = sv.run_settings(sv.SETTINGS, {}, {"path_relative": str(tmp_path)}, "exp", "relu", 1)
    log_path = run_folder.run_paths(settings)["log"]
    os.makedirs(os.path.dirname(log_path))
    precious = tmp_path / "precious.txt"
    precious.write_text("precious\n")
    os.symlink(precious, log_path)
    monkeypatch.setattr(local, "start_process", lambda args, log, env: "started")
    proc, log = local.launch(settings, {})
    log.close()
    assert proc == "started" and precious.read_text() == "precious\n"
    assert not os.path.islink(log_path)
    assert "deepnet_supervisor: " in open(log_path).read()
    proc, log = local.launch(settings, {})                     # a regular log is appended to
    log.close()
    assert open(log_path).read().count("deepnet_supervisor: ") == 2


def test_symlinked_0_analysis_and_0_summaries_are_not_written_through(tmp_path):
    outside = tmp_path / "outside"
    (outside / "analysis").mkdir(parents=True)
    (outside / "summaries").mkdir()
    (outside / "analysis" / "report.html").write_text("someone else's page")
    (outside / "summaries" / "events.x.hparams_config").write_text("someone else's config")
    real = small_experiment(str(tmp_path / "elsewhere" / "exp"))
    exp = tmp_path / "3_output_cifar" / "exp"      # a symlinked experiment folder, as a user may choose
    exp.parent.mkdir()
    exp.symlink_to(real)
    os.symlink(outside / "analysis", os.path.join(real, "0_analysis"))
    os.symlink(outside / "summaries", os.path.join(real, "0_summaries"))
    before = snapshot(str(outside))
    lines = []
    result = da.analyse_experiment(str(exp), out=lines.append)
    assert snapshot(str(outside)) == before
    analysis_dir = os.path.join(real, "0_analysis")
    assert not os.path.islink(analysis_dir) and os.path.isfile(os.path.join(analysis_dir, "report.html"))
    assert result["report"] == os.path.join(str(exp), "0_analysis", "report.html")
    assert sum("was a symbolic link: replaced by the analysis folder" in line for line in lines) == 1
    assert (f"HParams config not written: {os.path.join(str(exp), '0_summaries')}: is a symbolic link, not a "
            "folder the suite made") in lines
    assert os.path.islink(os.path.join(real, "0_summaries"))


def test_a_runs_tensorboard_folder_is_never_made_through_a_link(tmp_path):
    paths = run_folder.folder_paths(str(tmp_path / "exp"), "relu", 1)
    os.makedirs(paths["exp"])
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", os.path.join(paths["exp"], "0_summaries"))
    with pytest.raises(RunError, match="cannot write the TensorBoard summaries there .*0_summaries: is a symbolic "
                                       "link, not a folder the suite made"):
        outputs.make_tensorboard_folder(paths)
    assert os.listdir(tmp_path / "elsewhere") == []


# ---------------------------------------------------------------- group-shared experiments

def test_every_file_is_created_with_the_umask_of_the_moment(tmp_path):
    previous = os.umask(0o002)
    try:
        save_text(str(tmp_path / "shared.txt"), "x")
        with atomic_open(str(tmp_path / "also.bin")):
            pass
        os.umask(0o077)
        save_text(str(tmp_path / "private.txt"), "x")
    finally:
        os.umask(previous)
    assert oct(os.stat(tmp_path / "shared.txt").st_mode & 0o777) == oct(0o664)
    assert oct(os.stat(tmp_path / "also.bin").st_mode & 0o777) == oct(0o664)
    assert oct(os.stat(tmp_path / "private.txt").st_mode & 0o777) == oct(0o600)


def group_session(shared, plan):
    """Run in a fresh root (or single-user) interpreter: import everything, then each step of plan
    ([uid or None, 'train', spec, run] or [uid or None, 'analyse']) in a forked child with that user, the group of
    shared, umask 002. Prints the exit statuses as JSON."""
    import importlib
    import traceback
    import conftest
    import deepnet_task_cifar as task
    for module in LAZY_IMPORTS:  # a child that is another user may not read the interpreter's files
        importlib.import_module(module)
    os.umask(0o002)
    gid = os.stat(shared).st_gid
    conftest.write_tiny_data(shared)

    def step(uid, action, *args):
        if uid is not None:
            os.setgroups([gid])
            os.setgid(gid)
            os.setuid(uid)
        if action == "train":
            return task.run_training(conftest.run_settings(shared, spec_name=args[0], run=args[1]), out=quiet)
        da.analyse_experiment(os.path.join(shared, "3_output_cifar", "exp"), out=quiet)
        return 0

    codes = []
    for uid, *action in plan:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = step(uid, *action)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    print(json.dumps(codes))


def unused_ids():
    """Two user ids and a group id that no account uses."""
    import grp
    import pwd

    def unused(first, lookup):
        for n in range(first, first + 1000):
            try:
                lookup(n)
            except KeyError:
                yield n
    users = unused(GROUP_UIDS[0], pwd.getpwuid)
    return (next(users), next(users)), next(unused(GROUP_GID, grp.getgrgid))


def test_members_of_a_group_train_and_analyse_one_experiment(tmp_path):
    """With umask 002 in a setgid folder every folder the suite makes is group-writable (setgid inherited) and every
    file group-readable and -writable. As root, two users of one group train a run each in one experiment and
    both analyse it (the second analysis replaces the first one's set)."""
    import tempfile
    as_root = os.geteuid() == 0
    # as root the users need a folder they can reach: pytest's own temporary folders are private to root
    shared = tempfile.mkdtemp(prefix="group_", dir="/tmp") if as_root else str(tmp_path / "group")
    try:
        if as_root:
            (uid_a, uid_b), gid = unused_ids()
            os.chown(shared, 0, gid)
            plan = [[uid_a, "train", "relu", 1], [uid_b, "train", "relu", 2], [uid_b, "analyse"], [uid_a, "analyse"]]
        else:
            os.makedirs(shared)
            gid = os.getgid()
            plan = [[None, "train", "relu", 1], [None, "analyse"]]
        os.chmod(shared, 0o2775)
        code = (f"import sys; sys.path[:0] = [{os.path.join(ROOT, 'tests')!r}, {ROOT!r}]; "
                f"import test_safety_outputs as t; t.group_session({shared!r}, {plan!r})")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                                env=dict(os.environ, DEEPNET_FUSED_ABU="0"), preexec_fn=lambda: os.umask(0o002))
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads(result.stdout.splitlines()[-1]) == [0] * len(plan), result.stderr[-3000:]
        exp = os.path.join(shared, "3_output_cifar", "exp")
        made = [os.path.join(base, name) for base, dirs, files in os.walk(exp) for name in dirs + files]
        assert any("0_summaries" in path for path in made) and os.path.isfile(os.path.join(exp, "0_analysis",
                                                                                           "report.html"))
        for path in [exp] + made:
            info = os.lstat(path)
            assert info.st_gid == gid, path
            if os.path.isdir(path):
                assert oct(info.st_mode & 0o2070) == oct(0o2070), path
            else:
                assert oct(info.st_mode & 0o060) == oct(0o060), path
        if as_root:
            owners = {os.lstat(os.path.join(exp, "relu", f"run_{run}", f"record_relu_run_{run}.pkl")).st_uid
                      for run in (1, 2)}
            assert owners == {uid_a, uid_b}
            assert os.lstat(os.path.join(exp, "0_analysis", "report.html")).st_uid == uid_a
            assert len(glob.glob(os.path.join(exp, "0_summaries", "*.hparams_config"))) == 1
            judged = {name: list(csv.DictReader(open(os.path.join(exp, "0_analysis", name)), delimiter=";"))
                      for name in ("main_performance_analysis.csv", "excluded_runs.csv")}
            assert {row["category"] for row in judged["excluded_runs.csv"]} <= {"bad_test_acc"}  # a tiny run may be
            assert sum(int(row["n_runs"]) for row in judged["main_performance_analysis.csv"]) + len(
                judged["excluded_runs.csv"]) == 2
    finally:
        if as_root:
            import shutil
            shutil.rmtree(shared)


# ---------------------------------------------------------------- text escaped for where it goes

def test_spec_folders_whose_names_break_the_rule_are_skipped_with_one_line(tmp_path):
    exp = small_experiment(str(tmp_path / "3_output_cifar" / "exp"))
    hostile = ['=HYPERLINK("http:\\\\x";"y")', "a;b", "new\nline", "dollar$\\frac{", "-cmd", ".hidden"]
    for name in hostile:
        write_record(exp, light_record(name, 1, 0.7, 50))
    lines = []
    result = da.analyse_experiment(exp, out=lines.append)
    skipped = [line for line in lines if line.startswith("skipped folder ")]
    assert len(skipped) == len(hostile) and all("\n" not in line for line in skipped)
    assert all(": a spec name must be ASCII letters" in line for line in skipped)
    assert [row["spec_name"] for row in result["performance"]] == ["ABU", "relu"]
    for name in ("main_performance_analysis.csv", "excluded_runs.csv", "significance.csv"):
        with open(os.path.join(exp, "0_analysis", name), newline="") as handle:
            rows = list(csv.reader(handle, delimiter=";"))
        assert len({len(row) for row in rows}) == 1
        assert not any(bad in cell for row in rows for cell in row for bad in hostile)


def test_an_experiment_folder_whose_name_breaks_the_rule_is_refused(tmp_path):
    exp = small_experiment(str(tmp_path / "3_output_cifar" / "my exp"))
    with pytest.raises(UserError, match="experiment folder 'my exp': must be ASCII letters"):
        da.analyse_experiment(exp, out=quiet)
    assert sorted(os.listdir(exp)) == ["ABU", "relu"]


def test_csv_cells_are_quoted_and_formulas_stay_text(tmp_path):
    columns = ("spec_name", "reason", "value", "count")
    texts = ['=HYPERLINK("http://x";"y")', "a;b", "two\nlines", '+1', "-x", "@SUM(A1)", "\tx", "plain"]
    rows = [{"spec_name": text, "reason": f"why: {text}", "value": -0.25 * i, "count": -i}
            for i, text in enumerate(texts)]
    path = str(tmp_path / "table.csv")
    da.write_csv(path, columns, rows)
    with open(path, newline="") as handle:
        read = list(csv.reader(handle, delimiter=";"))
    assert read[0] == list(columns)
    assert [row[0] for row in read[1:]] == ["'" + text if text[0] in "=+-@\t" else text for text in texts]
    assert [row[1] for row in read[1:]] == [f"why: {text}" for text in texts]
    assert [row[2:] for row in read[1:]] == [[repr(-0.25 * i), str(-i)] for i in range(len(texts))]
    assert open(path).read().splitlines()[:2] == ["spec_name;reason;value;count",
                                                  '"\'=HYPERLINK(""http://x"";""y"")";"why: =HYPERLINK(""http://x"";'
                                                  '""y"")";-0.0;0']


def test_plot_titles_and_legends_are_drawn_as_written_not_as_math_text(tmp_path):
    names = "spec$\\frac{", "$\\notacommand$"
    grid = np.arange(0, N_MB + 1, 10)
    curve = (grid, np.linspace(0.3, 0.7, len(grid)), np.linspace(0.2, 0.6, len(grid)), np.linspace(0.4, 0.8, len(grid)))
    paths = [figures.plot_spec_performance(names[0], curve, 2, str(tmp_path / "a.png")),
             figures.plot_all_specs({name: curve for name in names}, str(tmp_path / "b.png"), names[1]),
             figures.plot_af_shapes(names[0], {"$layer": np.ones((2, len(figures.AF_X)))}, 2, str(tmp_path / "c.png"))]
    record = fake_record(names[1], 1, 0.7, 50, "1_relu", "unrestricted")
    outputs.plot_learning_curves(record, str(tmp_path / "d.png"))
    paths.append(str(tmp_path / "d.png"))
    for path in paths:
        assert open(path, "rb").read(8) == PNG_MAGIC


def test_status_skips_runs_whose_names_break_the_rule(tmp_path):
    runs = [sv.run_settings(sv.SETTINGS, {}, {"path_relative": str(tmp_path), "n_minibatches": 100}, experiment,
                            spec, run)
            for experiment, spec in (("exp", "relu"), ("exp", "../../elsewhere"), ("../x", "relu")) for run in (1, 2)]
    lines = []
    assert status.print_status(runs, 1, out=lines.append) == 0
    assert lines[:2] == ["skipped spec '../../elsewhere': its name must be ASCII letters, digits, '_', '.', '+', '-', "
                         "starting with a letter or a digit",
                         "skipped experiment '../x': its name must be ASCII letters, digits, '_', '.', '+', '-', "
                         "starting with a letter or a digit"]
    rows = [line.split()[:3] for line in lines[3:5]]
    assert rows == [["relu", "1", "not"], ["relu", "2", "not"]]
    assert lines[5].startswith("2 runs: ")


def test_run_and_checkpoint_folders_are_numbered_in_ascii_digits_only(tmp_path):
    exp = tmp_path / "exp"
    for name in ("run_1", "run_12", "run_\u0661", "run_\uff13", "run_1x"):
        (exp / "relu" / name).mkdir(parents=True)
    assert run_folder.run_numbers(str(exp), "relu") == [1, 12]
    models = tmp_path / "models"
    for name in ("ckpt_mb_0", "ckpt_mb_\u0662\u0660"):
        (models / name).mkdir(parents=True)
        (models / name / "recorder.pkl").write_bytes(b"")
    assert sorted(run_folder.checkpoint_dirs(str(models))) == [0]


def test_leftover_temporary_names_that_are_links_are_removed_never_followed(tmp_path):
    paths = run_folder.folder_paths(str(tmp_path / "exp"), "relu", 1)
    os.makedirs(paths["models"])
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("kept")
    os.symlink(outside, os.path.join(paths["models"], ".tmp_ckpt_mb_8_123"))
    os.symlink(outside / "keep.txt", os.path.join(paths["run_dir"], ".tmp_status.json.abcd1234"))
    run_folder.remove_temporary_files(paths)
    assert os.listdir(paths["models"]) == [] and not glob.glob(os.path.join(paths["run_dir"], ".tmp_*"))
    assert (outside / "keep.txt").read_text() == "kept"
