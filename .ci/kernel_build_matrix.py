"""The fused kernel's build on CPUs and compilers this machine does not have: each compiler builds it through
deepnet_network's own chain of flag sets, with -march=native replaced by a named target (aarch64: cross-compiled,
compile only). Builds for the AVX2 and plain x86-64 targets, which every x86-64 machine runs, are also loaded and
compared with the plain composition of TF ops (their 8- and 4-float packs; the test suite checks the host's own).
Prints one line per case with the flag set that worked; exits 1 if any case failed.

    python .ci/kernel_build_matrix.py            # every installed compiler of the matrix
"""
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X86_TARGETS = ("sapphirerapids", "skylake-avx512", "znver3", "haswell", "x86-64")
CASES = [(cxx, target) for cxx in ("g++", "g++-11", "g++-12", "g++-13", "g++-14", "clang++") for target in X86_TARGETS]
CASES += [("aarch64-linux-gnu-g++", target) for target in ("armv8-a", "armv8.2-a+fp16", "armv8.4-a+sve")]

# Forwards to the compiler with -march=native replaced by $TARGET; CROSS=1 compiles only (no TF library to link).
WRAPPER = r"""#!/bin/sh
case " $* " in *" --version "*) exec "$REAL_CXX" --version;; esac
set --  "$@" END
for arg; do
    shift
    case "$arg" in
        END) break;;
        -march=native) set -- "$@" "-march=$TARGET";;
        -shared) [ "$CROSS" = 1 ] && set -- "$@" -c || set -- "$@" -shared;;
        -L*|-l*) [ "$CROSS" = 1 ] || set -- "$@" "$arg";;
        *) set -- "$@" "$arg";;
    esac
done
exec "$REAL_CXX" "$@"
"""
RUNNABLE_TARGETS = ("haswell", "x86-64")
BUILD = """import sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import deepnet_network as net
tf = net.tf
paths = net._kernel_cache_paths()
built = net._build_abu_library(paths)
if built is None:
    sys.exit("FAILED " + open(paths["failed"]).read().strip())
if sys.argv[2] == "run":
    x = np.random.default_rng(0).normal(size=100003) * 4    # not a multiple of any pack width
    with tf.Graph().as_default():
        xs, w = tf.constant(x, tf.float32), tf.constant([0.9, -0.4, 0.6, -0.3, 0.5])
        outputs = []
        for fused in (True, False):
            y = net.activation(xs, "5_blend5_swish", w, 1.3, fused=fused)
            outputs.append([y, *tf.gradients(tf.reduce_sum(y * y), [xs, w])])
        with tf.Session() as sess:
            fused, plain = sess.run(outputs)
    error = max(float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b))))) for a, b in zip(fused, plain))
    if not error <= 1e-5:
        sys.exit(f"FAILED fused vs plain: relative error {error:.3g}")
    built += f"; fused = plain to {error:.1e}"
print(built)
"""


def build(cxx, target, folder):
    wrapper = os.path.join(folder, "cxx")
    with open(wrapper, "w") as f:
        f.write(WRAPPER)
    os.chmod(wrapper, 0o755)
    env = dict(os.environ, CXX=wrapper, REAL_CXX=cxx, TARGET=target, CROSS="1" if "aarch64" in cxx else "0",
               XDG_CACHE_HOME=os.path.join(folder, "cache"))
    run = "run" if target in RUNNABLE_TARGETS and "aarch64" not in cxx else "build"
    result = subprocess.run([sys.executable, "-c", BUILD, REPO, run], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        return (result.stderr.strip().splitlines() or [f"FAILED exit status {result.returncode}"])[-1]
    return result.stdout.strip().splitlines()[-1]


def main():
    failures, seen = 0, set()
    for cxx, target in CASES:
        found = shutil.which(cxx)
        if found is None or (os.path.realpath(found), target) in seen:   # not installed, or g++ is g++-12
            continue
        seen.add((os.path.realpath(found), target))
        with tempfile.TemporaryDirectory() as folder:
            line = build(cxx, target, folder)
        ok = not line.startswith("FAILED")
        failures += not ok
        flags, check = line.split(", ", 1)[-1].split(" (failed first")[0], line.partition("; fused = plain")[1:]
        used = (flags.split("; fused = plain")[0] + "".join(check)) if ok else line
        print(f"{'ok  ' if ok else 'FAIL'} {cxx:22s} {target:16s} {used}", flush=True)
    print(f"kernel build matrix: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
