"""The one rule for every name the suite puts into a path, typed or read back from disk, and for paths.

A name (experiment, spec) is 1 to MAX_NAME ASCII letters, digits, '_', '.', '+', '-', starting with a letter or
a digit, and not starting with '0_' (the experiment's own folders: 0_analysis, 0_summaries, ...). MAX_NAME keeps
every file name the suite derives from names (the longest: .tmp_run_info_<experiment>_<spec>_run_<run>.txt.<8>)
within the file system's 255 bytes. A path may hold anything but control characters (newline, tab, carriage
return, NUL, ...), which no file name of the suite contains and which would break a log line or a job script.
No TensorFlow, no numpy.
"""
import re

from deepnet_util import UserError

MAX_NAME = 100
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", re.ASCII)
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def name_problem(name):
    """Why name breaks the rule ('' if it does not)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        return "must be ASCII letters, digits, '_', '.', '+', '-', starting with a letter or a digit"
    if name.startswith("0_"):
        return "must not start with '0_' (the experiment's own folders do)"
    if len(name) > MAX_NAME:
        return f"must be at most {MAX_NAME} characters, got {len(name)}"
    return ""


def check_name(what, name):
    """UserError naming `what` (a flag, a setting or a folder) when name breaks the rule."""
    problem = name_problem(name)
    if problem:
        raise UserError(f"{what} {shown(name)}: {problem}")


def path_problem(path):
    """Why a path cannot be used ('' if it can): control characters, or empty."""
    if not isinstance(path, str) or not path:
        return "must be a non-empty path"
    if CONTROL.search(path):
        return "must not contain control characters (newline, tab, carriage return, NUL, ...)"
    return ""


def check_path(what, path):
    """UserError naming `what` when path cannot be used."""
    problem = path_problem(path)
    if problem:
        raise UserError(f"{what} {shown(path)}: {problem}")


def shown(text):
    """text as one printable line: quoted, control characters escaped, at most 120 characters."""
    text = repr(str(text))
    return text if len(text) <= 120 else text[:117] + "..."
