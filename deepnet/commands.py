"""A sweep's run as the supervisor sees it: its deepnet_main.py command line (built from its settings, checked with
deepnet_main's own parser), --set values in the types deepnet_main expects, and its files (a relative
-path_relative is relative to the suite's folder, where the supervisor starts its runs). No TensorFlow.
"""
import argparse
import os
import sys

from deepnet import names, run_folder
from deepnet_util import UserError

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # holds deepnet_main.py; runs start here
PER_RUN_FLAGS = ("mode", "experiment_name", "spec_name", "run")
NOT_PASSED = ("reference",)         # analysis-only settings, not given to training runs
# The settings that are names or paths, by deepnet/names.py's rule; '' means none for the optional names.
NAME_SETTINGS = ("experiment_name", "spec_name", "load_af_weights_from", "load_af_weights_experiment", "reference")
OPTIONAL_NAMES = ("load_af_weights_from", "load_af_weights_experiment")
PATH_SETTINGS = ("path_relative",)


def flag_table():
    """deepnet_main's flags: name -> (type, nargs); deepnet_main imports nothing heavy."""
    import deepnet_main
    return {name: (kind, rest[0] if rest else None) for name, kind, _, _, *rest in deepnet_main.FLAGS}


def convert(key, text, flags):
    """A --set value in the type deepnet_main expects for key."""
    kind, nargs = flags[key]
    parts = text.replace(",", " ").split() if nargs else [text]
    try:
        values = [None if kind is int and part == "None" else kind(part) for part in parts]
    except (ValueError, argparse.ArgumentTypeError) as err:
        raise UserError(f"--set {key}={echoed(text)}: {err}") from None
    if nargs and not values:
        raise UserError(f"--set {key}={echoed(text)}: needs at least one value")
    return values if nargs else values[0]


def echoed(text):
    """Typed text for an error line: as typed when it is one short plain line, else escaped (names.shown)."""
    text = str(text)
    return text if len(text) <= 120 and not names.CONTROL.search(text) else names.shown(text)


def setting_problem(key, value):
    """Why a name or path setting's value breaks deepnet/names.py's rule ('' if it does not, or if key is
    neither)."""
    if key in OPTIONAL_NAMES and value == "":
        return ""
    if key in NAME_SETTINGS:
        return names.name_problem(value)
    if key in PATH_SETTINGS:
        return names.path_problem(value)
    return ""


def check_names(settings, where):
    """UserError naming `where` and the setting when a run's name or path setting breaks the rule."""
    for key in (*NAME_SETTINGS, *PATH_SETTINGS):
        problem = setting_problem(key, settings.get(key, ""))
        if problem:
            raise UserError(f"{where}: -{key} {names.shown(settings.get(key))}: {problem}")


def flag_value(value):
    """A setting's value as command-line words."""
    if isinstance(value, bool):
        return [str(value)]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def command(settings, python=None):
    """The deepnet_main.py command line (a list) of one run: the per-run flags, then every setting in the order of
    the settings dict; seed None is left to deepnet_main."""
    args = [python or sys.executable, "deepnet_main.py"]
    for key in dict.fromkeys([*PER_RUN_FLAGS, *settings]):
        if key in NOT_PASSED or settings.get(key) is None:
            continue
        args += [f"-{key}", *flag_value(settings[key])]
    return args


def check_with_main(args):
    """Parse and validate a command with deepnet_main's own parser (UserError if it would refuse it)."""
    import deepnet_main
    parser = deepnet_main.parser()
    parser.error = lambda message: (_ for _ in ()).throw(UserError(message))
    deepnet_main.check_flags(vars(parser.parse_args(args[2:])))


def run_paths(settings):
    """The run's files (run_folder.run_paths) as the runs the supervisor starts see them."""
    return run_folder.run_paths(settings, REPO_DIR)


def project_root(settings):
    return run_folder.project_root(settings, REPO_DIR)


def experiment_dir(settings):
    return run_folder.experiment_dir(settings, REPO_DIR)


def run_name(settings):
    return f"{settings['spec_name']} run {settings['run']}"
