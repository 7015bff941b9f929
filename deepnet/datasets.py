"""The datasets: their names, classes and preprocessing variants, and where their files live. No TensorFlow, no
numpy (deepnet_main's flag choices come from here).

    <path_relative>/1_data_<task>/train_batches/, test_batches/                          the raw batches
    <path_relative>/1_data_<task>/train_set<sfx>/<task>_trainset.pkl (+ .json sidecar)   sfx: '', _ztrans, _gcn_zca
    <path_relative>/1_data_<task>/test_set<sfx>/<task>_testset.pkl   (+ .json sidecar)
    <path_relative>/1_data_<task>/train_set_gcn_zca/<task>_gcn_zca_params.npz           fitted gcn_zca parameters
    <path_relative>/1_data_<task>/.builds/<variant>-<id>/   one build of a variant: all of its files
    <path_relative>/1_data_<task>/.builds/<variant>         the switch: a symlink to the variant's current build

The preprocessing script writes each build into a folder of its own and then points the switch at it (one rename),
so a variant changes as a whole; the paths above are symlinks through the switch. Pickles at those paths that are
plain files (the original suite's, or ones put there by hand) are read as they are.
"""
import os

TASKS = ("cifar10", "cifar100")
N_CLASSES = {"cifar10": 10, "cifar100": 100}
VARIANTS = ("none", "ztrans", "gcn_zca")   # -preprocessing


def task_dir(root, task):
    """The folder of a task's raw and preprocessed data."""
    return os.path.join(root, f"1_data_{task}")


def output_paths(root, task, variant):
    """(training pickle, test pickle) of one variant."""
    suffix = "" if variant == "none" else f"_{variant}"
    return (os.path.join(task_dir(root, task), f"train_set{suffix}", f"{task}_trainset.pkl"),
            os.path.join(task_dir(root, task), f"test_set{suffix}", f"{task}_testset.pkl"))


def params_path(root, task):
    return os.path.join(os.path.dirname(output_paths(root, task, "gcn_zca")[0]), f"{task}_gcn_zca_params.npz")


def variant_files(root, task, variant):
    """Every file of one variant at its path above: the pickles, the gcn_zca parameters, the sidecars."""
    pickles = list(output_paths(root, task, variant))
    extra = [params_path(root, task)] if variant == "gcn_zca" else []
    return pickles + extra + [sidecar_path(path) for path in pickles]


def builds_dir(root, task):
    """The folder of a task's preprocessing builds and of each variant's switch."""
    return os.path.join(task_dir(root, task), ".builds")


def switch_path(root, task, variant):
    """The symlink naming a variant's current build folder (beside it in builds_dir)."""
    return os.path.join(builds_dir(root, task), variant)


def sidecar_path(pickle_path):
    """The JSON sidecar beside a preprocessed pickle: how it was made."""
    return os.path.splitext(pickle_path)[0] + ".json"


def data_files(settings):
    """(train pickle, test pickle) of a run's -task and -preprocessing under its -path_relative."""
    return output_paths(settings["path_relative"], settings["task"], settings["preprocessing"])
