#!/usr/bin/env bash
# Mutation testing of one module or package with mutmut, against the tests that are its own.
#
#   scripts/mutation.sh MODULE TEST... [-- MUTANT...]
#   scripts/mutation.sh labelstudio_maskclip/training/validation.py tests/test_training.py
#   scripts/mutation.sh 'labelstudio_maskclip/learning/*' tests/test_store.py tests/test_trigger.py
#
# MODULE is a path (or a glob) under labelstudio_maskclip/; each TEST is a pytest argument (a file, a node id,
# `--deselect=NODE`, `-k` then an expression). MUTANT names (as `mutmut results` prints them) re-run only those, e.g. the
# survivors once tests against them are in. The run lives in build/mutation/<module>/ (mutmut's cache: a
# second run tests only the functions that changed); there `mutmut results`, `mutmut show NAME` and
# `mutmut browse` read it. The settings shared by every run are pyproject.toml's [tool.mutmut]; JOBS (test
# processes at once), NICE, MEMORY_KB and TIMEOUT_MULTIPLIER (see below) are read from the environment.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
case $python in /*) ;; */*) python=$PWD/$python ;; esac  # the run happens in another folder
[ $# -ge 2 ] || { sed -n '2,12p' "$0"; exit 2; }
module=$1
shift
tests=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do tests+=("\"${1//\"/\\\"}\""); shift; done
[ "${1:-}" != "--" ] || shift
work=$root/build/mutation/$(printf '%s' "${module#labelstudio_maskclip/}" | tr '/*' '._')
mkdir -p "$work/mutants"  # before Python starts: a PYTHONPATH folder missing then is never searched
for name in labelstudio_maskclip tests docs docker benchmarks scripts setup.cfg README.md BENCHMARKS.md Makefile; do
    ln -sfn "$root/$name" "$work/$name"
done
{
    cat "$root/pyproject.toml"
    printf 'only_mutate = ["%s"]\n' "$module"
    printf 'pytest_add_cli_args_test_selection = [%s]\n' "$(IFS=,; echo "${tests[*]}")"
    # mutmut stops a mutant's tests after (their measured time + 1 s) x 15 of wall-clock time: on a loaded
    # machine, tests whose fixtures cost seconds read as timeouts; TIMEOUT_MULTIPLIER raises the factor.
    [ -z "${TIMEOUT_MULTIPLIER:-}" ] || printf 'timeout_multiplier = %s\n' "$TIMEOUT_MULTIPLIER"
} >"$work/pyproject.toml"
cd "$work"
# A mutant that asks for an enormous tensor fails with an error instead of taking the machine's memory.
ulimit -v "${MEMORY_KB:-12582912}"
# The tests start servers with `python -m ...`: PYTHONPATH makes them import the mutated copy too.
PYTHONPATH=$work/mutants nice -n "${NICE:-10}" "$python" -m mutmut run --max-children "${JOBS:-1}" "$@"
"$python" -m mutmut export-cicd-stats >/dev/null && cat mutants/mutmut-cicd-stats.json
