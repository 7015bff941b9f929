#!/usr/bin/env bash
# CI: render the analysis report (0_analysis/report.html) of a tiny fake experiment in headless Chromium and check
# that the screenshot shows a page with its plots, not a blank or error page. Root, Debian. Needs .venv (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
shot=${REPORT_SCREENSHOT:-/tmp/report_screenshot.png}
for attempt in 1 2 3; do
  if DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
     DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; then break; fi
  [ "$attempt" = 3 ] && { echo "check_report: could not install chromium" >&2; exit 1; }
  sleep 10
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# the fake recorders of tests/test_analysis.py: 4 specs, excluded and diverged runs, sidecars
report=$("$python" - "$work" <<'PY'
import os, sys
sys.path[:0] = [".", "tests"]
import deepnet_analysis
import test_analysis
root = sys.argv[1]
exp = os.path.join(root, "3_output_cifar", "ci_report")
test_analysis.build_experiment(exp)
test_analysis.write_sidecars(root)
result = deepnet_analysis.analyse_experiment(exp, reference="relu", out=lambda line: print(line, file=sys.stderr))
print(result["report"])
PY
)
rm -f "$shot"
timeout 180 chromium --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --hide-scrollbars \
  --screenshot="$shot" --window-size=1200,2000 "file://$report" 2>"$work/chromium.log" || {
  cat "$work/chromium.log" >&2; echo "check_report: chromium failed" >&2; exit 1; }
[ -s "$shot" ] || { cat "$work/chromium.log" >&2; echo "check_report: chromium wrote no screenshot" >&2; exit 1; }
"$python" - "$shot" <<'PY'
import sys
import matplotlib.image
import numpy as np
pixels = matplotlib.image.imread(sys.argv[1])[..., :3].astype(np.float64)
pixels = pixels * 255 if pixels.max() <= 1 else pixels
height, width = pixels.shape[:2]
non_white = int((pixels.min(axis=2) < 235).sum())
plot_blue = int((np.abs(pixels - [31, 119, 180]).max(axis=2) < 30).sum())   # matplotlib's first colour
print(f"check_report: screenshot {width}x{height}, pixel std {pixels.std():.1f}, non-white {non_white}, "
      f"plot-blue {plot_blue}")
problems = [text for bad, text in ((width != 1200 or height != 2000, "unexpected size"),
                                   (pixels.std() < 10, "almost uniform (blank page?)"),
                                   (non_white < 20000, "too few non-white pixels (blank page?)"),
                                   (plot_blue < 500, "no plot lines visible (images not rendered?)")) if bad]
if problems:
    sys.exit("check_report: " + "; ".join(problems))
PY
echo "check_report: ok ($shot)"
