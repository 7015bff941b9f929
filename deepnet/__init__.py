"""The machinery behind the five scripts (deepnet_supervisor.py, deepnet_main.py, deepnet_task_cifar.py,
deepnet_analysis.py, deepnet_task_cifar_preprocessing.py), one module per responsibility:

    activations    the activation functions (graph, numpy, plots), blend modes, initial AF weights   no TF
    architectures  the networks as layer lists, their layer names                                    no TF
    datasets       the datasets' names and classes, where their files live                           no TF, no numpy
    builds         a preprocessed variant's builds, switched in one step                             no TF, no numpy
    data           loading the data, split, epoch order, minibatches, data fingerprints             no TF
    schedule       learning rate, validation/checkpoint/weight-save minibatches, early stopping      no TF
    run_folder     a run's files, recorder and status.json, its lock, and run_state()               no TF
    identity       a run's settings as its identity: what may differ, what differs                  no TF
    names          the one rule for names and paths                                                 no TF, no numpy
    disk           what a run writes to disk, estimated; the warnings when that is much              no TF
    trainer        the training loop, checkpoints, evaluation (validation and test)
    outputs        weight files, run info, a run's plots, TensorBoard HParams                        no TF
    commands       a sweep's run as the supervisor sees it: command line, --set values, files      no TF
    local          the supervisor's preflight and worker pool                                       no TF
    cluster        SLURM / SGE job arrays                                                           no TF, no numpy
    status         --status                                                                         no TF, no numpy
    estimate       the --dry-run estimate (steps timed in a child process)                          no TF
    results        reading an experiment's runs for the analysis                                    no TF
    run_statistics descriptive statistics over runs and the significance tests                     no TF
    figures        the analysis plots                                                               no TF
    report         report.html                                                                      no TF
"""
