"""Where a sweep stands (--status): a row per run, the count per state, an ETA. Reads the run folders' status.json
files and locks, writes nothing; imports neither TensorFlow nor numpy, so it answers at once.
"""
import heapq
import os
from collections import Counter

from deepnet import commands, identity, names, run_folder
from deepnet_util import clock


# As --status shows them; 'differing': started with other settings than the selection's (a sweep refuses it).
STATES = ("complete", "running", "incomplete", "failed", "not started", "differing")
LEFT_TO_RUN = ("running", "incomplete", "failed", "not started")


def on_which_machine(holder, host):
    """'process 12 on node3' -> 'process 12 on node3 (this machine)' or '... (another machine)'."""
    where = "this machine" if holder.rpartition(" on ")[2] == host else "another machine"
    return f"{holder} ({where})"


def run_status(settings, host):
    """One row of --status (spec, run, state, mb, n, val, test, seconds, resume_mb, detail, kernel) from the run's
    state (run_folder.run_state: status.json and the lock; older runs: the recorder)."""
    paths = commands.run_paths(settings)
    state = run_folder.run_state(paths)
    status, holder = state.status, state.holder
    checkpoint_mb = status.get("last_checkpoint_mb")
    row = {"spec": settings["spec_name"], "run": settings["run"], "mb": status.get("mb") or 0,
           "n": status.get("n_minibatches") or settings["n_minibatches"], "val": status.get("val_top1"),
           "test": None, "seconds": status.get("train_seconds"), "resume_mb": checkpoint_mb or 0, "detail": "",
           "kernel": status.get("activation_kernel")}
    recorded, message = status.get("state"), status.get("message") or ""
    checkpoint = "no checkpoint" if checkpoint_mb is None else f"last checkpoint mb {checkpoint_mb}"
    writer = f"process {status.get('pid')} on {status.get('host')}"
    if state.name == "running":
        row.update(state="running", detail=on_which_machine(holder, host))
    elif state.name == "not started":
        row.update(state="not started", detail=f"no status file; its log may say why: {paths['log']}"
                   if os.path.isfile(paths["log"]) else "")
    elif recorded == "running" and holder is None:
        row.update(state="running", detail=f"{writer}, says status.json (the lock is not readable here)")
    elif recorded == "running":
        row.update(state="incomplete", detail=f"{writer} ended without a word; {checkpoint}")
    elif state.name in ("complete", "damaged"):   # a damaged one only needs its recorder rebuilt
        diverged = status.get("diverged_at_mb")
        row.update(state="complete", test=status.get("test_top1"),
                   detail="" if diverged is None else f"diverged at mb {diverged}")
    elif state.name == "failed":
        row.update(state="failed", detail=message or "failed")
    elif recorded == "diverged":  # under an older suite, untested: a sweep resumes it, and it is tested
        row.update(state="incomplete", detail=f"{message or 'diverged'}, not tested; the sweep retrains it to there "
                                              "and tests the best checkpoint before it")
    else:
        unknown = "" if recorded == "incomplete" else f"; unknown state {recorded!r} in status.json"
        row.update(state="incomplete", detail=checkpoint + (f"; {message}" if message else "") + unknown)
    return differing(row, settings, status)


def differing(row, settings, status):
    """The row as 'differing' when the run's status.json records other settings than the selection's (each
    difference: flag, recorded value -> selected value); else the row as it is."""
    differences = identity.differences_from_start(settings, None, status)
    if not differences:
        return row
    return dict(row, state="differing", detail=f"{row['state']}, with other settings: "
                                               f"{identity.describe(differences)}")


def accuracy(value):
    """An accuracy as the table shows it."""
    return "-" if value is None else f"{value:.4f}"


def status_table(rows):
    """The rows as aligned text lines, one per run."""
    header = ("spec", "run", "state", "minibatches", "val top-1", "test top-1", "kernel", "details")
    cells = [(r["spec"], str(r["run"]), r["state"], f"{r['mb']}/{r['n']}", accuracy(r["val"]), accuracy(r["test"]),
              str(r["kernel"] or "-").split(":")[0], r["detail"]) for r in rows]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header) - 1)]
    return [("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1]).rstrip()
            for line in [header, *cells]]


def status_eta(rows, workers):
    """The ETA line: the measured seconds per minibatch times each unfinished run's minibatches left; running
    runs hold a worker until they end, the others take the first free worker (see finish_time)."""
    left = [r for r in rows if r["state"] in LEFT_TO_RUN]
    if not left:
        return "nothing left to run"
    timed = [r for r in rows if r["state"] == "complete" and r["seconds"] and r["mb"]]
    source = f"{len(timed)} complete run(s)"
    if not timed:
        timed = [r for r in rows if r["seconds"] and r["mb"]]
        source = f"{len(timed)} unfinished run(s) so far"
    if not timed:
        return "ETA unknown: no run has recorded its training time yet"
    per_mb = sum(r["seconds"] for r in timed) / sum(r["mb"] for r in timed)
    busy = [max(r["n"] - r["mb"], 0) for r in left if r["state"] == "running"]
    waiting = [max(r["n"] - r["resume_mb"], 0) for r in left if r["state"] != "running"]
    slots = max(workers, len(busy))
    seconds = finish_time([mb * per_mb for mb in busy], [mb * per_mb for mb in waiting], slots)
    more = f" (one per running run; --workers {workers})" if slots > workers else ""
    return (f"ETA {clock(seconds)} with {slots} workers{more}: {per_mb * 1000:.1f} ms per minibatch measured on "
            f"{source}, {sum(busy) + sum(waiting)} minibatches left, running runs keep their worker and the others "
            "take the first free one")


def kernel_counts(rows):
    """{'fused' or 'plain: <why>': number of runs} over the runs that recorded their activation kernel."""
    return Counter(row["kernel"] for row in rows if row["kernel"])


def print_status(runs, workers, out=print):
    """The --status report: a row per run, counts per state, the ETA; returns 0."""
    host = os.uname().nodename
    rows = [run_status(settings, host) for settings in runs_with_valid_names(runs, out)]
    for line in status_table(rows):
        out(line)
    counts = {state: 0 for state in STATES}
    for row in rows:
        counts[row["state"]] += 1
    texts = {state: f"{counts[state]} {state}" for state in STATES if counts[state] or state != "differing"}
    diverged = sum(row["state"] == "complete" and row["detail"].startswith("diverged") for row in rows)
    if diverged:
        texts["complete"] += f" ({diverged} diverged)"
    out(f"{len(rows)} runs: " + ", ".join(texts.values()))
    kernels = kernel_counts(rows)
    if kernels:
        out("activation kernel: " + "; ".join(f"{kernel} in {n} run(s)" for kernel, n in kernels.items()))
    out(status_eta(rows, workers))
    return 0


def runs_with_valid_names(runs, out):
    """The runs whose experiment and spec names pass the rule (deepnet/names.py); one line per other name: its
    folders are skipped, never read."""
    valid, reported = [], set()
    for settings in runs:
        bad = {(what, settings[key]) for what, key in (("experiment", "experiment_name"), ("spec", "spec_name"))
               if names.name_problem(settings[key])}
        if not bad:
            valid.append(settings)
        for what, name in sorted(bad - reported):
            out(f"skipped {what} {names.shown(name)}: its name {names.name_problem(name)}")
        reported |= bad
    return valid


def finish_time(busy, pending, workers):
    """Seconds until every run has ended: each busy run holds a worker for its remaining seconds; pending
    runs (their expected seconds, in launch order) each take the worker that frees first."""
    free_at = list(busy) + [0.0] * max(workers - len(busy), 0)
    heapq.heapify(free_at)
    for seconds in pending:
        heapq.heappush(free_at, heapq.heappop(free_at) + seconds)
    return max(free_at, default=0.0)
