"""Building the fused activation kernel: the chain of target flag sets, the cache (one compile per machine and
cache, a failed build is not retried), and what a process reports when the kernel cannot be used.

Each case runs in a fresh Python process with its own cache folder (XDG_CACHE_HOME) and a stand-in compiler
(CXX) that logs every call and forwards it to the real one, so nothing here depends on what this machine's
compiler does with -march=native.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_CXX = shutil.which(os.environ.get("CXX", "g++"))
EIGEN_FP16_ERROR = ("tensorflow/include/Eigen/src/Core/arch/AVX512/PacketMathFP16.h:740:49: error: expected "
                    "initializer before '<' token")

# Logs each compile (its target flags) to $CXX_LOG, then: 'fail-first' fails the first compile with the error
# TF's Eigen gives under AVX512-FP16, 'fail-all' fails every compile, 'forward' compiles with the real compiler.
STAND_IN = r"""#!/bin/sh
case " $* " in *" --version "*) echo "stand-in compiler 1.0"; exit 0;; esac
flags=""
for arg in "$@"; do case "$arg" in -march=*|-mno-avx512fp16) flags="$flags $arg";; esac; done
echo "compile:$flags" >> "$CXX_LOG"
if [ "$MODE" = fail-all ] || { [ "$MODE" = fail-first ] && [ "$(wc -l < "$CXX_LOG")" -eq 1 ]; }; then
    echo "In file included from tensorflow/core/framework/op_kernel.h:1:" >&2
    echo "ERROR_LINE" >&2
    exit 1
fi
exec REAL_CXX "$@"
"""

# In the child: the kernel state, the build description, and the fused ABU against the plain composition.
CHILD = """import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import deepnet_network as net
tf = net.tf
state = net.kernel_state()
result = {"state": state, "build": net.kernel_build(), "error": None}
if state == "fused":
    rng = np.random.default_rng(0)
    x = rng.normal(size=4000) * 3
    with tf.Graph().as_default() as graph:
        xs = tf.constant(x)
        w = tf.constant([0.9, -0.4, 0.6, -0.3, 0.5], tf.float64)
        outputs = []
        for fused in (True, False):
            y = net.activation(xs, "5_blend5_swish", w, 1.3, fused=fused)
            outputs.append([y] + tf.gradients(tf.reduce_sum(y * y), [xs, w]))
        result["ops"] = sorted({op.type for op in graph.get_operations() if op.type.startswith("Deepnet")})
        with tf.Session() as sess:
            fused, plain = sess.run(outputs)
    result["error"] = max(float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))
                          for a, b in zip(fused, plain))
print(json.dumps(result))
"""


@pytest.fixture
def stand_in(tmp_path):
    """(run(mode) -> child result, compile log lines(), cache folder) with a fresh cache."""
    assert REAL_CXX, "the fused kernel needs a C++ compiler: install g++ or set CXX"
    script = tmp_path / "cxx"
    script.write_text(STAND_IN.replace("REAL_CXX", REAL_CXX)
                      .replace("ERROR_LINE", EIGEN_FP16_ERROR))
    script.chmod(0o755)
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    log, cache = tmp_path / "cxx.log", tmp_path / "cache"

    def run(mode, cxx=str(script)):
        env = dict(os.environ, CXX=cxx, XDG_CACHE_HOME=str(cache), CXX_LOG=str(log), MODE=mode)
        env.pop("DEEPNET_FUSED_ABU", None)
        return subprocess.Popen([sys.executable, str(child), REPO], env=env, cwd=str(tmp_path),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def compiles():
        return log.read_text().splitlines() if log.exists() else []

    return run, compiles, cache


def finish(proc):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def test_a_compiler_failing_like_eigen_fp16_on_the_first_flag_set_still_gives_the_fused_kernel(stand_in):
    run, compiles, _ = stand_in
    result, err = finish(run("fail-first"))
    assert result["state"] == "fused" and result["ops"] == ["DeepnetAbuBackward", "DeepnetAbuForward"]
    assert result["error"] <= 1e-12                                    # float64: fused equals plain
    assert compiles()[0] == "compile: -march=native -mno-avx512fp16"
    assert "failed first: -march=native -mno-avx512fp16: " + EIGEN_FP16_ERROR in result["build"]
    assert result["build"].startswith("stand-in compiler 1.0, ")
    flag_sets = [line.removeprefix("compile:").strip() for line in compiles()]
    assert len(flag_sets) == len(set(flag_sets)) >= 2                  # each set tried once, in order, until one works
    assert flag_sets == [" ".join(s) for s in (("-march=native", "-mno-avx512fp16"), ("-march=native",), ())
                         ][:len(flag_sets)]
    if flag_sets[-1] == "":                                            # only the default target compiled: said so
        assert "built for the compiler's default target" in err
    again, _ = finish(run("fail-first"))
    assert again["state"] == "fused" and len(compiles()) == len(flag_sets)   # cached: no compile


def test_without_a_compiler_the_reason_is_reported_and_the_failure_is_cached(stand_in, tmp_path):
    run, compiles, cache = stand_in
    result, err = finish(run("fail-all", cxx=str(tmp_path / "no-such-compiler")))
    assert result["state"].startswith("plain: compiling deepnet_abu_op.cc failed: no C++ compiler: ")
    assert "no-such-compiler" in result["state"] and "\n" not in result["state"]
    assert result["build"] == ""
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "2x slower" in warnings[0]
    [failed] = [name for name in os.listdir(cache / "deepnet_abu") if name.endswith(".failed")]
    # a compiler that fails every flag set: every set tried once, then never again (the failure is cached)
    first, _ = finish(run("fail-all"))
    assert first["state"].startswith("plain: compiling deepnet_abu_op.cc failed: -march=native -mno-avx512fp16: ")
    assert first["state"].count(EIGEN_FP16_ERROR) == 3 and len(compiles()) == 3
    second, _ = finish(run("fail-all"))
    assert second["state"] == first["state"] and len(compiles()) == 3


def test_processes_starting_at_once_compile_each_flag_set_once(stand_in):
    run, compiles, _ = stand_in
    procs = [run("forward") for _ in range(3)]
    results = [finish(proc)[0] for proc in procs]
    assert {r["state"] for r in results} == {"fused"} and len({r["build"] for r in results}) == 1
    flag_sets = compiles()
    assert len(flag_sets) == len(set(flag_sets)) >= 1


def test_the_state_names_each_reason_for_the_plain_composition(tmp_path):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import deepnet_network as net; tf = net.tf\n"
            "print(net.kernel_state())\n"
            "with tf.Graph().as_default() as g:\n"
            "    x = tf.zeros([2, 3])\n"
            "    for af_set in ('1_tanh', '5_blend5_swish'):\n"
            "        net.activation(x, af_set, [1.0] * int(af_set[0]), 1.0)\n"
            "    print(net.activation_kernel(g))\n")
    env = dict(os.environ, DEEPNET_FUSED_ABU="0", XDG_CACHE_HOME=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code, REPO], env=env, capture_output=True, text=True,
                            timeout=300, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["plain: DEEPNET_FUSED_ABU=0",
                                          "plain: no fused kernel for tanh (only 5_blend5_swish and 1_relu have one)"]
    assert not os.path.exists(tmp_path / "deepnet_abu")                   # switched off: nothing built


THREADS_CHILD = """import hashlib, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import deepnet_network as net
tf = net.tf
x = np.random.default_rng(1).normal(size=300007).astype(np.float32) * 3   # many blocks, ragged end
with tf.Graph().as_default():
    xs, w = tf.constant(x), tf.constant([0.9, -0.4, 0.6, -0.3, 0.5])
    y = net.activation(xs, "5_blend5_swish", w, 1.3, fused=True)
    grads = tf.gradients(tf.reduce_sum(y * tf.sin(xs)), [xs, w])
    config = tf.ConfigProto(intra_op_parallelism_threads=int(sys.argv[2]), inter_op_parallelism_threads=1)
    with tf.Session(config=config) as sess:
        values = sess.run([y, *grads])
print(hashlib.sha256(b"".join(np.ascontiguousarray(v).tobytes() for v in values)).hexdigest())
"""


def test_the_fused_kernel_gives_the_same_bits_with_any_number_of_threads(tmp_path):
    digests = []
    for threads in (1, 2, 3):
        result = subprocess.run([sys.executable, "-c", THREADS_CHILD, REPO, str(threads)], capture_output=True,
                                text=True, timeout=300, cwd=str(tmp_path))
        assert result.returncode == 0, result.stderr
        digests.append(result.stdout.strip())
    assert len(digests[0]) == 64 and digests == [digests[0]] * 3
