#!/usr/bin/env bash
# `make test-compat`: the core tests and the demo on each stack of compat/<stack>.txt, one venv per stack under
# .compat/<stack> (rebuilt when its stack file, compat/test-deps.txt or pyproject.toml changes). torch is the same
# CPU wheel in every stack file; the project is installed with --no-deps, so nothing resolves torch again, and
# `pip check` then verifies that the stack meets pyproject.toml's bounds. pip's cache is the user's, shared by all.
#
# Usage: scripts/test_compat.sh [STACK ...]   (default: every compat/*.txt but test-deps.txt)
# Writes compat-out/<stack>.log (pytest), compat-out/<stack>-demo/ (the demo's files) and compat-out/summary.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=compat-out

# The core tests: tracing, tokens (slow tokenizers on transformers 4.x), joint models where the stack supports
# them, version gating, attention-dispatcher backends, the demo model, and the Triton interpreter suite.
CORE_TESTS=(
    tests/test_trace.py tests/test_tokens.py tests/test_tokens_slow.py tests/test_joint.py tests/test_versions.py
    tests/test_backends.py tests/test_demo.py tests/test_triton_kernels.py::test_triton_kernels_in_interpreter
)

if [ $# -gt 0 ]; then
    STACKS=("$@")
else
    STACKS=()
    for f in compat/*.txt; do
        name=$(basename "$f" .txt)
        [ "$name" = test-deps ] || STACKS+=("$name")
    done
fi

build_venv() {
    local stack=$1 venv=.compat/$1
    local stamp=$venv/.installed
    if [ -f "$stamp" ] && [ "$stamp" -nt "compat/$stack.txt" ] && [ "$stamp" -nt compat/test-deps.txt ] \
        && [ "$stamp" -nt pyproject.toml ]; then
        return 0
    fi
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv" &&
        "$venv/bin/python" -m pip install -q -r "compat/$stack.txt" -r compat/test-deps.txt &&
        DAAM_FAST_BUILD_CUDA=0 "$venv/bin/python" -m pip install -q --no-deps -e . &&
        "$venv/bin/python" -m pip check &&
        touch "$stamp"
}

mkdir -p "$OUT"
summary=$OUT/summary.md
{
    echo "| stack | diffusers | transformers | triton | core tests | demo | seconds |"
    echo "|---|---|---|---|---|---|---|"
} > "$summary"
failed=0
for stack in "${STACKS[@]}"; do
    t0=$(date +%s)
    echo "== $stack: building .compat/$stack"
    if ! build_venv "$stack" > "$OUT/$stack-install.log" 2>&1; then
        echo "   venv build failed, see $OUT/$stack-install.log"
        grep -v "WARNING: Location" "$OUT/$stack-install.log" | tail -20
        echo "| $stack | ? | ? | ? | venv build failed | - | $(($(date +%s) - t0)) |" >> "$summary"
        failed=1
        continue
    fi
    py=.compat/$stack/bin/python
    read -r dv tv trv < <("$py" -c "import diffusers, transformers, triton; \
print(diffusers.__version__, transformers.__version__, triton.__version__)" 2>/dev/null)
    echo "   diffusers $dv, transformers $tv, triton $trv: core tests"
    "$py" -m pytest -q -p no:cacheprovider "${CORE_TESTS[@]}" > "$OUT/$stack.log" 2>&1
    rc=$?
    tests=$(grep -E "^(=+ )?[0-9]+ (passed|failed)" "$OUT/$stack.log" | tail -1 | sed 's/=//g; s/ in .*//; s/^ *//')
    [ $rc -eq 0 ] || { failed=1; grep -E "^(FAILED|ERROR) " "$OUT/$stack.log" | head -40; }
    echo "   $tests"
    rm -rf "$OUT/$stack-demo"
    .compat/$stack/bin/daam-fast demo --out "$OUT/$stack-demo" > "$OUT/$stack-demo.log" 2>&1
    drc=$?
    n_png=$(find "$OUT/$stack-demo" -name '*.png' 2>/dev/null | wc -l)
    # 3 prompts: an image and a dominance figure each, plus one overlay per colour/shape word (4 + 4 + 6).
    if [ $drc -eq 0 ] && [ "$n_png" -eq 20 ]; then demo="ok ($n_png files)"; else demo="FAILED (exit $drc, $n_png files)"; failed=1; fi
    echo "   daam-fast demo: $demo"
    echo "| $stack | $dv | $tv | $trv | $tests | $demo | $(($(date +%s) - t0)) |" >> "$summary"
done
echo
cat "$summary"
exit $failed
