# Sourced by train.sh and measure.sh: the call's clock (left: seconds until START + BUDGET, at
# least 1), the log folder and timeline, ml_collections from the carried wheel, and the workdir,
# imported from the carried params (.carry/s12-*.npz) when this machine has none.
START=$(date +%s)
left() { local s=$((START + ${BUDGET:-570} - $(date +%s))); [ $s -lt 1 ] && s=1; echo $s; }
L=/tmp/logs; mkdir -p $L
T() { echo "$(date +%T) $*" >> $L/timeline.txt; }
filter() { grep -v "INFO\|^I1\|^W1"; }
test -d /tmp/site || pip install -q --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
W=/tmp/s12
if [ ! -d $W ] && ls .carry/s12-*.npz >/dev/null 2>&1; then
  python3 -m experiments.lm.params_file import --files='.carry/s12-*.npz' --workdir=$W 2>&1 \
    | filter >> $L/import.log; T imported rc=${PIPESTATUS[0]}
fi
