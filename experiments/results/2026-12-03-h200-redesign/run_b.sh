#!/usr/bin/env bash
# Issue 26, fifteenth session, call B (right after run_a.sh, same machine): the compiled GPU
# test subset again, with ml_collections installed from the carried wheel (run_a.sh's test step
# stopped at collection: three test files import it).
#   run: bash experiments/results/2026-12-03-h200-redesign/run_b.sh   (carry .whl; writes $OUT)
pip install -q --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
timeout 400 python3 -m pytest -q -m gpu tests > $OUT/gpu_tests.log 2>&1; echo rc=$?
tail -n 15 $OUT/gpu_tests.log
