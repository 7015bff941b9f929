"""A sweep's run as the supervisor sees it: its deepnet_main.py command line (built from its settings, checked with
deepnet_main's own parser), --set values in the types deepnet_main expects, and its files (a relative
-path_relative is relative to the suite's folder, where the supervisor starts its runs). No TensorFlow.
"""
import argparse
import os
import sys

from deepnet import run_folder
from deepnet_util import UserError

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # holds deepnet_main.py; runs start here
PER_RUN_FLAGS = ("mode", "experiment_name", "spec_name", "run")
NOT_PASSED = ("reference",)         # analysis-only settings, not given to training runs


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
        raise UserError(f"--set {key}={text}: {err}") from None
    if nargs and not values:
        raise UserError(f"--set {key}={text}: needs at least one value")
    return values if nargs else values[0]


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
