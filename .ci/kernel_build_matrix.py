"""The fused kernel's build on CPUs and compilers this machine does not have: each compiler builds it through
deepnet_network's own chain of flag sets, with -march=native replaced by a named target (aarch64: cross-compiled,
compile only). Prints one line per case with the flag set that worked; exits 1 if any case found none.

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
BUILD = ("import sys; sys.path.insert(0, sys.argv[1]); import deepnet_network as net\n"
         "paths = net._kernel_cache_paths()\n"
         "built = net._build_abu_library(paths)\n"
         "print(built if built is not None else 'FAILED ' + open(paths['failed']).read().strip())\n")


def build(cxx, target, folder):
    wrapper = os.path.join(folder, "cxx")
    with open(wrapper, "w") as f:
        f.write(WRAPPER)
    os.chmod(wrapper, 0o755)
    env = dict(os.environ, CXX=wrapper, REAL_CXX=cxx, TARGET=target, CROSS="1" if "aarch64" in cxx else "0",
               XDG_CACHE_HOME=os.path.join(folder, "cache"))
    result = subprocess.run([sys.executable, "-c", BUILD, REPO], env=env, capture_output=True, text=True)
    return (result.stdout.strip().splitlines() or [f"FAILED {result.stderr.strip()[-300:]}"])[-1]


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
        used = line.split(", ", 1)[-1].split(" (failed first")[0] if ok else line
        print(f"{'ok  ' if ok else 'FAIL'} {cxx:22s} {target:16s} {used}", flush=True)
    print(f"kernel build matrix: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
