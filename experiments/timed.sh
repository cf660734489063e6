# Sourced by the experiment scripts. timed NAME COMMAND...: run COMMAND, log its output to $OUT/logs/NAME.log
# (progress bars only there, the rest also to the terminal), and append its wall time to $TIMINGS.
timed() {
    local name=$1 start=$SECONDS statuses
    shift
    echo "== $name: $*" | tee -a "$TIMINGS"
    set +e
    "$@" < /dev/null 2>&1 | tee "$OUT/logs/$name.log" | grep -v -E 'it/s\]|s/it\]|item/s\]|batch/s\]|step/s\]'
    statuses=("${PIPESTATUS[@]}")
    set -e
    echo "   $name: $((SECONDS - start)) s, exit ${statuses[0]}" | tee -a "$TIMINGS"
    return "${statuses[0]}"
}
