"""Graph-mode (TF1) conv nets whose activation functions can be trained, and the fused CPU kernel that runs them.

The networks are built from the layer lists of deepnet/architectures.py with the activation functions of
deepnet/activations.py. Each activated layer owns ``blend_weights_raw`` (shape [n]) and, when a blend contains
jswish, ``swish_beta`` (shape [1]); the blend mode maps the raw weights to the effective weights that multiply the
functions. Layers and variables carry the original suite's names: '<network>/<layer>/<variable>:0' with layers
conv1.., dense<k>.., denseout numbered through the net (smcn: conv1-conv4, dense5, dense6, denseout).

    python deepnet_network.py [--rebuild-kernel]     # the fused activation kernel's state on this machine
"""
import fcntl
import hashlib
import os
import subprocess
import sys
from collections import namedtuple

import numpy as np

from deepnet import activations as af, architectures as arch
from deepnet_util import import_tf

tf = import_tf()


def activation(preact, af_set, blend_weights_raw, swish_beta=1.0, blend_mode="unrestricted",
               component_transform=None, fused=None):
    """Build the blended activation sum_i w_i f_i(preact) for effective weights w (TF ops).

    Weights and beta may be tensors or variables; gradients flow to them. ``component_transform``
    (used by batch-normalised nets) is applied to each component before blending. Without a
    transform, the blend5 set and 1_relu run as fused kernels (see _fused_abu) unless ``fused`` is
    False (None: the module flag FUSED_ABU; True: the kernel is required). The implementation used,
    'fused' or 'plain: <why>', is recorded in the graph (see activation_kernel()).
    """
    names = af.parse_af_set(af_set)
    raw = tf.convert_to_tensor(blend_weights_raw, dtype=preact.dtype)
    if not raw.shape.is_compatible_with([len(names)]):
        raise ValueError(f"activation set '{af_set}' needs {len(names)} blend weights, got shape {raw.shape}")
    weights = af.effective_weights(raw, blend_mode)
    beta = tf.convert_to_tensor(swish_beta, dtype=preact.dtype)
    if component_transform is None:
        kernel, state = _fused_kernel(names, preact, beta, fused)
    else:
        kernel, state = None, "plain: batch-normalised blend components have no fused kernel"
    tf.add_to_collection(_ACTIVATION_KERNELS, state)
    if kernel is not None:
        return kernel(preact, weights, beta)
    components = [af.BASE_FUNCTIONS[name].graph(preact, beta) for name in names]
    if component_transform is not None:
        components = [component_transform(c, i) for i, c in enumerate(components)]
    out = weights[0] * components[0]
    for i in range(1, len(components)):
        out = out + weights[i] * components[i]
    return out


# ---------------------------------------------------------------- fused activation kernels
# The plain composition above costs ~20 memory passes and 5 full-size intermediates per layer.
# deepnet_abu_op.cc computes the blend5 ABU in one pass and its gradients w.r.t. x, the five
# effective weights and beta in a second one (two exps per element, recomputed from x); 1_relu's
# w * relu(x) likewise (its gradient w.r.t. x and w in one pass instead of four). Same mathematics
# as the plain composition. Compiled on first use into a per-user cache (one compile per machine,
# however many processes start at once); a build that fails is cached too, with its reason, so a
# sweep tries it once. Every graph records which implementation it uses (activation_kernel()).

FUSED_ABU = os.environ.get("DEEPNET_FUSED_ABU", "1") != "0"  # False: the plain composition everywhere
_ABU_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deepnet_abu_op.cc")
FUSED_SETS = {af.NAMED_BLENDS["blend5_swish"]: "5_blend5_swish", ("relu",): "1_relu"}
# Target flags, tried in order; the first set that compiles is used, every failure is kept for the
# message. GCC >= 12 turns AVX512-FP16 on for -march=native on Sapphire Rapids and later Xeons, and
# TensorFlow's bundled Eigen then fails to compile (PacketMathFP16.h), so the first set switches it
# off. Compilers that do not know that flag (GCC < 12, old clang) never turn it on: the second set.
# The last is the compiler's default target: slower, and said so.
BUILD_FLAG_SETS = (("-march=native", "-mno-avx512fp16"), ("-march=native",), ())
_ACTIVATION_KERNELS = "activation_kernels"  # graph collection: one entry per activated layer
_abu_state = {}  # "library": the loaded op module or None; "build": the build description; "why": the failure


def kernel_state():
    """'fused' when the fused kernels run on this machine, else 'plain: <reason in one line>'."""
    if not FUSED_ABU:
        return "plain: DEEPNET_FUSED_ABU=0"
    if tf.config.list_physical_devices("GPU"):
        return "plain: a GPU is used (the fused kernels are CPU-only)"
    if _abu_library() is None:
        return f"plain: {_abu_state['why']}"
    return "fused"


def kernel_build():
    """How the loaded kernel was built: the compiler's version line and the flag set that worked
    ('g++ (Debian 12.2.0-14) 12.2.0, -march=native -mno-avx512fp16'); '' if none is loaded."""
    return _abu_state.get("build", "") if _abu_library() is not None else ""


def activation_kernel(graph):
    """What the activated layers of a graph run on: 'fused', or 'plain: <reason>' if any layer does not."""
    used = graph.get_collection(_ACTIVATION_KERNELS)
    return next((state for state in used if state != "fused"), "fused") if used else "plain: no activated layer"


def _fused_kernel(names, preact, beta, fused):
    """(the fused kernel for this activation or None, 'fused' or 'plain: <why>'); fused=True: required."""
    if fused is False:
        return None, "plain: asked for by the caller"
    kernel = {af.NAMED_BLENDS["blend5_swish"]: _fused_abu, ("relu",): _fused_scaled_relu}.get(tuple(names))
    why = None
    if kernel is None:
        why = f"plain: no fused kernel for {'+'.join(names)} (only {' and '.join(FUSED_SETS.values())} have one)"
    elif preact.dtype not in (tf.float32, tf.float64) or beta.shape.rank != 0:
        why = "plain: the fused kernels need a float32/float64 input and a scalar beta"
    elif fused is None:
        state = kernel_state()
        why = None if state == "fused" else state
    elif _abu_library() is None:
        raise RuntimeError(f"the fused activation kernels could not be built: {_abu_state['why']}")
    if why is not None and fused:
        raise ValueError(f"the fused kernels need the blend5 set or 1_relu, a float32/float64 input and a "
                         f"scalar beta ({why})")
    return (None, why) if why is not None else (kernel, "fused")


def _fused_abu(x, weights, beta):
    """w0 relu(x) + w1 elu(x) + w2 tanh(x) + w3 x sigmoid(beta x) + w4 x as one op; weights [5]
    are the effective weights (the blend mode stays outside, autodiff handles it)."""
    return _abu_library().deepnet_abu_forward(x, weights, beta)


def _fused_scaled_relu(x, weights, beta=None):
    """weights[0] * relu(x) as one op (1_relu; beta is unused)."""
    return _abu_library().deepnet_scaled_relu(x, weights[0])


def _abu_gradient(op, dy):
    x, weights, beta = op.inputs
    return _abu_library().deepnet_abu_backward(x, dy, weights, beta)


def _scaled_relu_gradient(op, dy):
    x, weight = op.inputs
    return _abu_library().deepnet_scaled_relu_grad(x, dy, weight)


def _abu_library():
    """The loaded kernel, built on first use; None (after one warning line) if it cannot be."""
    if "library" not in _abu_state:
        _abu_state["library"] = _load_abu_library()
    return _abu_state["library"]


def _load_abu_library(rebuild=False):
    paths = _kernel_cache_paths()
    try:
        built = _build_abu_library(paths, rebuild)
        if built is not None:
            library = tf.load_op_library(paths["so"])
    except (OSError, tf.errors.OpError) as err:
        built, why = None, f"building or loading {paths['so']} failed: {' '.join(str(err).split())}"
    else:
        why = None if built is not None else _read_text(paths["failed"]).strip() or "the build failed"
    if built is None:
        _abu_state["why"] = why
        print(f"warning: fused activation kernels unavailable ({why}); using the plain composition, about "
              "2x slower for ABU runs", file=sys.stderr)
        return None
    _abu_state["build"] = built
    if "-march=native" not in built.split(" (failed first")[0]:
        print(f"note: the fused activation kernels were built for the compiler's default target ({built}), "
              "slower than for this CPU", file=sys.stderr)
    for op_type, gradient in (("DeepnetAbuForward", _abu_gradient), ("DeepnetScaledRelu", _scaled_relu_gradient)):
        try:
            tf.RegisterGradient(op_type)(gradient)
        except KeyError:  # registered by an earlier import of this module
            pass
    return library


def _compiler():
    return os.environ.get("CXX", "g++")


def _compiler_version():
    """The compiler's first --version line, or why it cannot be run (part of the cache key)."""
    try:
        result = subprocess.run([_compiler(), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unavailable ({err.strerror if isinstance(err, OSError) else 'no answer'})"
    return (result.stdout.strip().splitlines() or [f"exit status {result.returncode}"])[0]


def _abu_build_command(output, target_flags):
    return [_compiler(), "-shared", "-fPIC", "-O3", *target_flags, "-fno-trapping-math", "-fno-math-errno", "-w",
            *tf.sysconfig.get_compile_flags(), _ABU_SOURCE, "-o", output, *tf.sysconfig.get_link_flags()]


def _cpu_signature():
    """The CPU's feature flags: a kernel built with -march=native only runs on such a CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def kernel_cache_dir():
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "deepnet_abu")


def _kernel_cache_paths():
    """The cache files for this source, TensorFlow, compiler, flag chain and CPU: the kernel (.so), how it
    was built (.build) or why it could not be (.failed), and the lock that serialises the build."""
    with open(_ABU_SOURCE, "rb") as f:
        source = f.read()
    key = repr((tf.version.VERSION, _abu_build_command("out.so", ()), BUILD_FLAG_SETS, _compiler_version(),
                _cpu_signature())).encode()
    stem = os.path.join(kernel_cache_dir(), f"deepnet_abu_{hashlib.sha256(source + key).hexdigest()[:16]}")
    return {"so": stem + ".so", "build": stem + ".build", "failed": stem + ".failed", "lock": stem + ".lock"}


def _read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _build_abu_library(paths, rebuild=False):
    """Compile the kernel once across concurrent processes (lock file, atomic renames). Returns the build
    description, or None when every flag set failed (the reasons are then in paths['failed'])."""
    os.makedirs(os.path.dirname(paths["so"]), exist_ok=True)
    with open(paths["lock"], "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if rebuild:
            for name in ("so", "build", "failed"):
                if os.path.exists(paths[name]):
                    os.remove(paths[name])
        if os.path.exists(paths["so"]):
            return _read_text(paths["build"]).strip() or "cached"
        if os.path.exists(paths["failed"]):
            return None
        failures = []
        for flags in BUILD_FLAG_SETS:
            error = _compile(paths["so"], flags)
            if error is None:
                built = f"{_compiler_version()}, {' '.join(flags) or 'default target'}"
                if failures:
                    built += f" (failed first: {'; '.join(failures)})"
                _write_atomically(paths["build"], built + "\n")
                return built
            failures.append(f"{' '.join(flags) or 'default target'}: {error}")
            if error.startswith("no C++ compiler"):
                failures = [error]
                break
        _write_atomically(paths["failed"], f"compiling {os.path.basename(_ABU_SOURCE)} failed: "
                                           f"{'; '.join(failures)}\n")
        return None


def _compile(output, flags):
    """Compile into output atomically; None on success, else the first error line. A compiler killed by a
    signal raises OSError: that failure says nothing about the next try, so it is not cached."""
    partial = f"{output}.{os.getpid()}.tmp"
    try:
        try:
            result = subprocess.run(_abu_build_command(partial, flags), capture_output=True, text=True)
        except OSError as err:
            return f"no C++ compiler: '{_compiler()}' cannot be run ({err.strerror}); install g++ or set CXX"
        if result.returncode < 0:
            raise OSError(f"the compiler was stopped by signal {-result.returncode}")
        if result.returncode == 0 and os.path.exists(partial):
            os.replace(partial, output)
            return None
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    lines = (result.stderr + result.stdout).strip().splitlines() or [f"exit status {result.returncode}"]
    return next((line for line in lines if "error" in line), lines[-1]).strip()[:300]


def _write_atomically(path, text):
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "w") as f:
        f.write(text)
    os.replace(partial, path)


def rebuild_kernel():
    """Delete this machine's cached kernel (or cached failure) and build it again; returns kernel_state()."""
    _abu_state.clear()
    _abu_state["library"] = _load_abu_library(rebuild=True)
    return kernel_state()


# ---------------------------------------------------------------- graph pieces

Inputs = namedtuple("Inputs", "images labels keep_probs training step lr staging")
Staging = namedtuple("Staging", "images labels put clear")  # see make_inputs


def staging_device():
    """The device each minibatch is copied to during the step before its own (a GPU's), or None on the CPU."""
    return "/device:GPU:0" if tf.config.list_physical_devices("GPU") else None


def make_inputs(image_shape=(32, 32, 3), stage_on=None):
    """Placeholders fed by the training loop.

    With stage_on (a device), images and labels are the outputs of a staging area on that device: a training
    step reads the minibatch staged before it, while Staging.put (fed Staging.images and Staging.labels, run in
    the same Session.run) copies the next one there. Feeding images and labels directly (evaluation) still
    works and leaves the staging area alone. Staging.clear empties it."""
    images = tf.placeholder(tf.float32, (None,) + tuple(image_shape), name="next_images" if stage_on else "images")
    labels = tf.placeholder(tf.int64, (None,), name="next_labels" if stage_on else "labels")
    staging = None
    if stage_on:
        area, dtypes = "minibatch_stage", [tf.float32, tf.int64]
        with tf.device(stage_on):
            put = tf.raw_ops.Stage(values=[images, labels], shared_name=area, name="stage")
            clear = tf.raw_ops.StageClear(dtypes=dtypes, shared_name=area, name="stage_clear")
            staging = Staging(images, labels, put, clear)
            images, labels = tf.raw_ops.Unstage(dtypes=dtypes, shared_name=area, name="images")
        images.set_shape((None,) + tuple(image_shape))
        labels.set_shape((None,))
    return Inputs(
        images=images,
        labels=labels,
        keep_probs=tf.placeholder_with_default(tf.ones([1]), (None,), name="keep_probs"),
        training=tf.placeholder_with_default(False, (), name="training"),
        step=tf.placeholder_with_default(tf.constant(0, tf.int64), (), name="step"),
        lr=tf.placeholder_with_default(0.001, (), name="lr"),
        staging=staging,
    )


def _weight(name, shape, stddev, seed):
    init = tf.truncated_normal_initializer(stddev=stddev, seed=seed)
    return tf.get_variable(name, shape, tf.float32, init, collections=[
        tf.GraphKeys.GLOBAL_VARIABLES, tf.GraphKeys.TRAINABLE_VARIABLES, "decayed_weights"])


def _dropout(x, keep_probs, index, step, seed):
    """Inverted dropout with a stateless mask keyed on (seed, step, layer): no session history."""
    keep = keep_probs[tf.minimum(index, tf.shape(keep_probs)[0] - 1)]

    def dropped():
        key = tf.stack([tf.constant(seed, tf.int64), step * 64 + index])
        noise = tf.random.stateless_uniform(tf.shape(x), seed=key, dtype=x.dtype)
        return x * tf.floor(keep + noise) / keep

    return tf.cond(keep < 1.0, dropped, lambda: x)


BN_DECAY, BN_EPSILON = 0.99, 1e-3


def _batch_norm(x, training, name, inference=arch.BN_INFERENCE[0]):
    """Batch statistics in training; at inference those of the batch too, or the moving averages
    (inference='moving_averages'). The moving averages are kept up to date either way (UPDATE_OPS)."""
    with tf.variable_scope(name):
        axes = list(range(len(x.shape) - 1))
        depth = x.shape[-1]
        gamma = tf.get_variable("gamma", [depth], initializer=tf.ones_initializer())
        beta = tf.get_variable("beta", [depth], initializer=tf.zeros_initializer())
        moving_mean = tf.get_variable("moving_mean", [depth], initializer=tf.zeros_initializer(),
                                      trainable=False)
        moving_var = tf.get_variable("moving_variance", [depth], initializer=tf.ones_initializer(),
                                     trainable=False)
        mean, var = tf.nn.moments(x, axes)
        for moving, batch in ((moving_mean, mean), (moving_var, var)):
            tf.add_to_collection(tf.GraphKeys.UPDATE_OPS,
                                 tf.assign(moving, BN_DECAY * moving + (1 - BN_DECAY) * batch))
        if inference == "moving_averages":
            mean, var = tf.cond(training, lambda: (mean, var),
                                lambda: (tf.identity(moving_mean), tf.identity(moving_var)))
        elif inference != "batch_statistics":
            raise ValueError(f"unknown batch-norm inference '{inference}' (known: {', '.join(arch.BN_INFERENCE)})")
        return tf.nn.batch_normalization(x, mean, var, beta, gamma, BN_EPSILON)


# ---------------------------------------------------------------- TensorBoard summaries, as the original's

SUMMARIES = "train_summaries"  # evaluated every SUMMARY_EVERY minibatches on the training minibatch
# The tensors whose histograms TensorBoard shows, and their tags (same order): the trainer fetches them with the
# step and buckets them off it, in its summary writer's thread (deepnet/histograms.py).
HISTOGRAMS, HISTOGRAM_TAGS = "train_histograms", "train_histogram_tags"
PRE_UPDATE_READS = "pre_update_reads"  # copies of the variables the summaries show; the update waits for them
SUMMARY_IMAGES = 32  # activation summaries sample this many images: a whole minibatch costs ~4 steps


def variable_summaries(tensor, tag):
    """mean, stddev, max and min scalars and a histogram of a tensor (the original's variable_summaries),
    tagged '<tag>/mean' ... '<tag>/histogram'; the histogram is made by the trainer (HISTOGRAMS)."""
    mean = tf.reduce_mean(tensor)
    for name, value in (("mean", mean), ("stddev", tf.sqrt(tf.reduce_mean(tf.square(tensor - mean)))),
                        ("max", tf.reduce_max(tensor)), ("min", tf.reduce_min(tensor))):
        tf.add_to_collection(SUMMARIES, tf.raw_ops.ScalarSummary(tags=f"{tag}/{name}", values=value))
    tf.add_to_collection(HISTOGRAMS, tensor)
    tf.add_to_collection(HISTOGRAM_TAGS, f"{tag}/histogram")


def _activation_summaries(tensor, label):
    """Summaries of a layer's (pre-)activations over the first SUMMARY_IMAGES images of the minibatch."""
    variable_summaries(tensor[:SUMMARY_IMAGES], _scoped(label))


def _scoped(label):
    return f"{tf.get_variable_scope().name}/{label}"


def _summarise_variable(variable, label):
    """Summaries of a variable's value before this step's update: a copy (a read would share the buffer the update
    writes into), and train() orders the update after it."""
    value = tf.raw_ops.Snapshot(input=variable.read_value())
    tf.add_to_collection(PRE_UPDATE_READS, value)
    variable_summaries(value, _scoped(label))


# ---------------------------------------------------------------- layers

ActivationVars = namedtuple("ActivationVars", "raw effective beta")


def _activation_layer(preact, settings, af_init, training, use_bn):
    """Create this layer's blend weights (and beta) and apply the blended activation."""
    names = af.parse_af_set(settings["af_set"])
    _activation_summaries(preact, "preact")
    raw = tf.get_variable("blend_weights_raw", initializer=tf.constant(af_init["blend_weights"], tf.float32),
                          trainable=settings["blend_trainable"])
    _summarise_variable(raw, "blend_weights")
    beta = None
    if any(af.BASE_FUNCTIONS[n].uses_beta for n in names):
        beta = tf.get_variable("swish_beta", initializer=tf.constant([af_init["swish_beta"]], tf.float32),
                               trainable=settings["swish_beta_trainable"])
        _summarise_variable(beta, "swish_beta")
    transform = None
    if use_bn and len(names) > 1:
        inference = arch.bn_inference(settings)
        transform = lambda c, i: _batch_norm(c, training, f"bn_component{i + 1}", inference)  # noqa: E731
    out = activation(preact, settings["af_set"], raw, 1.0 if beta is None else beta[0],
                     settings["blend_mode"], component_transform=transform)
    _activation_summaries(out, "activation")
    return out, ActivationVars(raw, af.effective_weights(raw, settings["blend_mode"]), beta)


def _weighted_layer(x, kind, width, seed, first):
    """conv (width = (kernel, channels)) or dense (width = units) with its weights, biases and summaries."""
    if kind == "conv":
        k, c_in, c_out = width[0], int(x.shape[-1]), width[1]
        w = _weight("weights", [k, k, c_in, c_out], np.sqrt(2.0 / (k * k * c_in)), seed)
        b = tf.get_variable("biases", [c_out], initializer=tf.constant_initializer(0.0 if first else 0.1))
        out = tf.nn.bias_add(tf.nn.conv2d(x, w, 1, "SAME"), b)
    else:
        if len(x.shape) > 2:
            x = tf.reshape(x, [-1, int(np.prod(x.shape[1:]))])
        n_in = int(x.shape[-1])
        w = _weight("weights", [n_in, width], np.sqrt(2.0 / (n_in * width)), seed)
        b = tf.get_variable("biases", [width], initializer=tf.constant_initializer(0.1))
        out = tf.matmul(x, w) + b
    _summarise_variable(w, "weights")
    _summarise_variable(b, "biases")
    return out


Endpoints = namedtuple("Endpoints", "preacts activations af_vars")


def inference(inputs, settings, af_init=None):
    """Build the network of settings['network'] on inputs.images; returns (logits, endpoints).

    Variables live in '<network>/<layer>/' (resource variables, so summaries can show pre-update
    values). af_init: layer name -> {'blend_weights': array, 'swish_beta': float}; default 1/n and beta 1.
    """
    network = settings["network"]
    if network not in arch.ARCHITECTURES:
        raise ValueError(f"unknown network '{network}' (known: {', '.join(arch.ARCHITECTURES)})")
    af_init = af_init or af.default_af_init(network, settings["af_set"])
    use_bn = network in arch.BATCH_NORM_NETWORKS
    names = arch.layer_names(network)
    x, dropout_index, weighted = inputs.images, 0, 0
    preacts, activations, af_vars = {}, {}, {}
    with tf.variable_scope(network, use_resource=True):
        for layer in arch.ARCHITECTURES[network]:
            kind = layer[0]
            if kind == "dropout":
                x = _dropout(x, inputs.keep_probs, dropout_index, inputs.step, settings["seed"])
                dropout_index += 1
                continue
            if kind in ("maxpool", "avgpool"):
                pool = tf.nn.max_pool2d if kind == "maxpool" else tf.nn.avg_pool2d
                x = pool(x, layer[1], layer[2], "SAME")
                continue
            name = names[weighted]
            weighted += 1
            width = settings["n_classes"] if kind == "logits" else layer[1] if kind == "dense" else layer[1:]
            with tf.variable_scope(name):
                x = _weighted_layer(x, "conv" if kind == "conv" else "dense", width, weighted, weighted == 1)
                if kind == "logits":
                    break
                if use_bn:
                    x = _batch_norm(x, inputs.training, "bn", arch.bn_inference(settings))
                preacts[name] = x
                x, af_vars[name] = _activation_layer(x, settings, af_init[name], inputs.training, use_bn)
                activations[name] = x
    return x, Endpoints(preacts, activations, af_vars)


def loss(logits, labels, wd_lambda=0.0):
    """(total, cross_entropy): mean softmax cross-entropy plus wd_lambda * sum of tf.nn.l2_loss
    (sum w^2 / 2) over the conv and dense weights (the original's weight decay)."""
    cross_entropy = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
    if not wd_lambda:
        return cross_entropy, cross_entropy
    decay = tf.add_n([tf.nn.l2_loss(w) for w in tf.get_collection("decayed_weights")])
    return cross_entropy + wd_lambda * decay, cross_entropy


OPTIMIZERS = {
    "Adam": lambda lr: tf.train.AdamOptimizer(lr),
    "SGD": lambda lr: tf.train.GradientDescentOptimizer(lr),
    "Momentum": lambda lr: tf.train.MomentumOptimizer(lr, 0.9),
    "Nesterov": lambda lr: tf.train.MomentumOptimizer(lr, 0.9, use_nesterov=True),
}


def train(total_loss, optimizer, lr):
    """One optimizer step on all trainable variables, with gradient summaries; it runs after the
    batch-norm updates and after the reads the summaries show."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{optimizer}' (known: {', '.join(OPTIMIZERS)})")
    opt = OPTIMIZERS[optimizer](lr)
    grads_and_vars = opt.compute_gradients(total_loss)
    for grad, var in grads_and_vars:
        if grad is not None:
            variable_summaries(grad, f"{var.op.name}/gradient")
    with tf.control_dependencies(tf.get_collection(tf.GraphKeys.UPDATE_OPS) + tf.get_collection(PRE_UPDATE_READS)):
        return opt.apply_gradients(grads_and_vars)


Model = namedtuple("Model", "inputs logits loss cross_entropy top1 top5 predictions train_op "
                            "endpoints preact_stats summaries histograms model_variables activation_kernel")


def build_model(settings, af_init=None, image_shape=(32, 32, 3)):
    """The whole training graph in the default graph: placeholders, net, loss, metrics, train op, summaries."""
    tf.set_random_seed(settings["seed"])
    inputs = make_inputs(image_shape, staging_device())
    logits, endpoints = inference(inputs, settings, af_init)
    model_variables = tf.global_variables()  # before the optimizer adds its slots
    total_loss, cross_entropy = loss(logits, inputs.labels,
                                     settings["wd_lambda"] if settings["use_wd"] else 0.0)
    top1 = tf.reduce_mean(tf.cast(tf.nn.in_top_k(logits, inputs.labels, 1), tf.float32))
    top5 = tf.reduce_mean(tf.cast(tf.nn.in_top_k(logits, inputs.labels, min(5, settings["n_classes"])),
                                  tf.float32))
    for name, value in (("loss", total_loss), ("top1", top1), ("top5", top5)):
        tf.add_to_collection(SUMMARIES, tf.raw_ops.ScalarSummary(tags=f"objective/{name}", values=value))
    train_op = train(total_loss, settings["optimizer"], inputs.lr)
    preact_stats = {name: tf.nn.moments(p, list(range(len(p.shape))))
                    for name, p in endpoints.preacts.items()}
    return Model(inputs, logits, total_loss, cross_entropy, top1, top5, tf.argmax(logits, 1), train_op,
                 endpoints, preact_stats, tf.summary.merge_all(SUMMARIES),
                 dict(zip(tf.get_collection(HISTOGRAM_TAGS), tf.get_collection(HISTOGRAMS))), model_variables,
                 activation_kernel(tf.get_default_graph()))


# ---------------------------------------------------------------- AF weights of a session

def read_af_weights(sess, endpoints):
    """Current AF weights: layer -> {'blend_weights_raw', 'blend_weights', 'swish_beta' (or None)}."""
    fetch = {}
    for name, v in endpoints.af_vars.items():
        fetch[name] = {"blend_weights_raw": v.raw, "blend_weights": v.effective}
        if v.beta is not None:
            fetch[name]["swish_beta"] = v.beta
    values = sess.run(fetch)
    for layer in values.values():
        layer["swish_beta"] = float(layer["swish_beta"][0]) if "swish_beta" in layer else None
    return values


def main(argv=None):
    """python deepnet_network.py [--rebuild-kernel]: the fused activation kernel's state on this machine."""
    import argparse
    parser = argparse.ArgumentParser(description=main.__doc__.split(": ")[1])
    parser.add_argument("--rebuild-kernel", action="store_true",
                        help=f"delete the cached kernel (or cached build failure) in {kernel_cache_dir()} and "
                             "build it again")
    args = parser.parse_args(argv)
    state = rebuild_kernel() if args.rebuild_kernel else kernel_state()
    where = f"; {kernel_build()}; cache {kernel_cache_dir()}" if state == "fused" else ""
    print(f"activation kernel: {state}{where}")
    return 0 if state == "fused" else 1


if __name__ == "__main__":
    sys.exit(main())
