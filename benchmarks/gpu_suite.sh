#!/usr/bin/env bash
# GPU verification suite (see benchmarks/gpu_suite.py for the steps). On the GPU machine:
#
#   bash benchmarks/gpu_suite.sh [--smoke] [--budget 480] [--only a,b] [--skip a,b]
#   RALU_COMMIT=<sha> bash benchmarks/gpu_suite.sh --smoke --only build,smoke --budget 330   # the smoke step (~5 min)
#   bash benchmarks/gpu_suite.sh --only build,latency_video --budget 530   # full-size Wan 480p video, own call
#
# RALU_COMMIT: the commit measured, recorded in smoke_<device>.json where the copy has no .git.
#
# Packages the GPU image lacks (diffusers 0.42.1 and importlib_metadata) travel as wheels in .whl/
# (README, "GPU checks"); they are installed with --no-deps into a private folder put on PYTHONPATH.
# On a CPU: bash benchmarks/gpu_suite.sh --dry-run [--smoke] (toy sizes; uses the current environment).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
case " $* " in
  *" --dry-run"*) ;;
  *)
    if compgen -G ".whl/*.whl" >/dev/null; then
      site=${RALU_SUITE_SITE:-/tmp/ralu-suite-site}
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "gpu_suite: installing the carried wheels failed" >&2; exit 1; }
      export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    ;;
esac
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PY" -m benchmarks.gpu_suite "$@"
