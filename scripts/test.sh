#!/usr/bin/env bash
# The whole test suite on a CPU machine, from a fresh clone: sets up what it needs, then runs
#   1. unit, registration, config-error and end-to-end vLLM CPU engine tests (LLM offline + OpenAI server),
#      and the example notebooks, in the vLLM CPU venv (.venv);
#   2. SGLang's attention test kit and plugin tests in the SGLang venv (.venv-sglang).
# Prints one summary line "longseq: N passed, N failed" and exits non-zero on any failure.
#   bash scripts/test.sh [extra pytest args for the vLLM run]
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${LONGSEQ_VENV:-$repo/.venv}
sgl_venv=${LONGSEQ_SGLANG_VENV:-$repo/.venv-sglang}
bash "$repo/scripts/setup.sh" || exit 1
bash "$repo/scripts/setup_sglang.sh" || exit 1
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT  # the junit files are only read below
# Run from a neutral directory: a folder named like the package in the cwd could shadow the install.
cd "$out"
"$venv/bin/python" -m pytest "$repo/tests" -m "not gpu and not sglang" -p no:cacheprovider \
  --timeout 1800 --durations 40 --junitxml "$out/vllm.xml" "$@"
rc1=$?
"$sgl_venv/bin/python" -m pytest "$repo/tests/sglang" -m sglang -p no:cacheprovider --timeout 900 --durations 10 \
  --junitxml "$out/sglang.xml"
rc2=$?
"$venv/bin/python" - "$out/vllm.xml" "$out/sglang.xml" <<'PY'
import sys, xml.etree.ElementTree as ET
tot = dict(tests=0, failures=0, errors=0, skipped=0)
for path in sys.argv[1:]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        tot["errors"] += 1
        continue
    for s in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
        for k in tot:
            tot[k] += int(s.get(k, 0))
failed = tot["failures"] + tot["errors"]
passed = tot["tests"] - failed - tot["skipped"]
print(f"longseq: {passed} passed, {failed} failed, {tot['skipped']} skipped")
PY
[ $rc1 -eq 0 ] && [ $rc2 -eq 0 ]
