#!/usr/bin/env bash
# Runs ON the GPU machine, from the project's root, one job of a GPU session under a time budget:
#   [STACK=vllm|sglang] [BUDGET_S=540] [BENCH_COMMIT=<sha>] bash scripts/gpu/job.sh NAME command ...
# STACK=vllm (default) sources the vLLM bundle's env and, when set up, Mooncake's; STACK=sglang adds the SGLang
# site (never vLLM in the same shell). The command's full output goes to $OUT/NAME.log, result files it writes
# under benchmarks/results to $OUT/results; the job stops itself BUDGET_S seconds in, so the call returns
# what it has before the device tool's own limit.
set -uo pipefail
name=$1; shift
out=${OUT:-/tmp/out}; mkdir -p "$out/results"
source /tmp/lsq-bundle/env.sh
[ -f /tmp/site-mc/mooncake/store.so ] && source scripts/gpu/mooncake_env.sh
[ "${STACK:-vllm}" = sglang ] && source scripts/gpu/sglang_env.sh
stamp=$(mktemp); t0=$(date +%s)
timeout -k 10 "${BUDGET_S:-540}" "$@" > "$out/$name.log" 2>&1
rc=$?
find benchmarks/results -type f -newer "$stamp" -exec cp {} "$out/results/" \; 2>/dev/null
echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s"
grep -E "^(PASSED|FAILED|ERROR|SKIPPED|XFAIL)|passed|failed|Error|error:|ratio|x faster|TTFT|TPOT" "$out/$name.log" | tail -n 60
