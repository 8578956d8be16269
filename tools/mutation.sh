#!/usr/bin/env bash
# Mutation testing of the core modules with mutmut (3.x): does the test suite notice small bugs?
#
#   bash tools/mutation.sh                 # every group below (about 30-60 min on 2 cores)
#   bash tools/mutation.sh losses overlay  # some groups
#
# Too slow for CI; run it before changing the tests of these modules. It works on a copy of src/ and
# tests/ in a temporary folder (never in this checkout), mutates only the functions named below, runs for each
# mutant the tests that reach that function (mutmut's per-function test map, fastest first, stopping at
# the first failure), and ends with the line
#
#   mutation score: K/N killed (P%)
#
# killed = a test failed (or timed out) with the mutant in place; the rest survived (or no test reached
# them). Surviving mutants that change no behaviour are listed in tools/mutation-equivalent.md, so the
# score can be read honestly. Tests that start subprocesses (torchrun, the SIGKILL/resume run) are left
# out: the mutated code lives in mutmut's copy, which a subprocess does not import.
#
# Environment: PYTHON (default .venv/bin/python), JOBS (parallel mutants, default 2), SOURCE=worktree tests
# the working tree instead of the last commit (HEAD), KEEP=1 keeps the work folder (mutmut's own
# `mutmut results` / `mutmut show NAME` work inside each group's folder there).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
JOBS="${JOBS:-2}"

if ! "$PYTHON" -c 'import mutmut, sys; sys.exit(not mutmut.__version__.startswith("3."))' 2>/dev/null; then
  echo "installing mutmut 3 (a developer tool; not a dependency of resunetpp)" >&2
  "$PYTHON" -m pip install -q 'mutmut>=3.8,<4'
fi

# group | files to mutate (only_mutate globs) | mutant name patterns (the functions) | tests (files or node ids;
# export-parity takes the fast parity tests only: the shared dynamo export + int8 fixture would make each
# mutant a minute long)
SPECS=(
  "metrics|src/resunetpp/evaluation/metrics.py|resunetpp.evaluation.metrics.x_confusion__* resunetpp.evaluation.metrics.x__ratio__* resunetpp.evaluation.metrics.x_scores__* resunetpp.evaluation.metrics.x_summarize__*|tests/evaluation/test_metrics.py tests/evaluation/test_metrics_edge_cases.py"
  "losses|src/resunetpp/training/losses.py|resunetpp.training.losses.*|tests/training/test_losses.py"
  "schedule|src/resunetpp/training/loop.py|resunetpp.training.loop.x_make_scheduler__* resunetpp.training.loop.x_make_optimizer__* resunetpp.training.loop.x_epoch_shard__*|tests/training/test_train.py"
  "checkpoint|src/resunetpp/training/loop.py src/resunetpp/training/runtime.py src/resunetpp/hub.py src/resunetpp/utils.py|resunetpp.training.loop.x_load_checkpoint__* resunetpp.training.loop.x_validate__* resunetpp.training.runtime.x_rng_state__* resunetpp.training.runtime.x_set_rng_state__* resunetpp.training.runtime.x_weights_finite__* resunetpp.hub.x_save_pretrained__* resunetpp.hub.x_load_config__* resunetpp.hub.x_load_model__* resunetpp.hub.x_state_mismatch__* resunetpp.hub.x__files__* resunetpp.utils.x_atomic_path__*|tests/training/test_train.py tests/training/test_train_failures.py tests/inference/test_hub.py tests/inference/test_model_validation.py tests/test_utils_figures.py"
  "augment|src/resunetpp/data/augment.py|resunetpp.data.augment.*|tests/data/test_data_augment.py tests/training/test_distill.py"
  "export-parity|src/resunetpp/inference/export.py|resunetpp.inference.export.x_parity_shapes__* resunetpp.inference.export.x_check_parity__* resunetpp.inference.export.x_concat_fed__*|tests/inference/test_export.py::test_check_parity_checks_every_shape_not_only_the_first tests/inference/test_export.py::test_check_parity_counts_nan_as_a_failure_in_any_shape tests/inference/test_export.py::test_check_parity_refuses_a_shape_mismatch tests/inference/test_export.py::test_export_refuses_a_model_whose_logits_are_nan tests/inference/test_export.py::test_legacy_exporter_opset17_and_parity_failure tests/inference/test_export.py::test_concat_fed_names_the_concats_and_the_convolutions_reading_them tests/inference/test_export.py::test_check_parity_is_relative_to_large_logits_only_and_reproducible tests/inference/test_export.py::test_parity_shapes_are_the_configs_and_a_non_square_one_near_three_quarters_by_five_quarters"
  "overlay|src/resunetpp/inference/overlay.py|resunetpp.inference.overlay.*|tests/inference/test_overlay.py tests/inference/test_video.py tests/inference/test_no_polyp.py"
  "training-step|src/resunetpp/training/loop.py|resunetpp.training.loop.x_training_step__*|tests/training/test_training_step.py"
  "stream|src/resunetpp/serve/stream.py|resunetpp.serve.stream.x__stream_options__* resunetpp.serve.stream.x__stream_answer__*|tests/serve/test_serve_stream_and_upload.py tests/serve/test_serve.py"
  "upload|src/resunetpp/serve/images.py|resunetpp.serve.images.x__read_body__* resunetpp.serve.images.x_read_uploads__* resunetpp.serve.images.x_parse_multipart__*|tests/serve/test_serve_stream_and_upload.py tests/serve/test_serve.py"
  "segmenter-checks|src/resunetpp/inference/segmenter.py src/resunetpp/inference/transforms.py|resunetpp.inference.transforms.x_preprocess_images__* resunetpp.inference.transforms.x_check_threshold__* resunetpp.inference.segmenter.xǁSegmenterǁ__init____*|tests/inference/test_infer.py"
)
# left out of every run: subprocess tests (see above) and the real-data training run
DESELECT="-k not torchrun and not sigkill and not real_kvasir"

WANT=("$@")
WORK="$(mktemp -d "${TMPDIR:-/tmp}/resunetpp-mutation.XXXXXX")"
[[ "${KEEP:-0}" == 1 ]] || trap 'rm -rf "$WORK"' EXIT
SUMMARY="$WORK/summary.tsv"
: > "$SUMMARY"

for spec in "${SPECS[@]}"; do
  IFS='|' read -r name files patterns tests <<< "$spec"
  if ((${#WANT[@]})) && [[ ! " ${WANT[*]} " == *" $name "* ]]; then continue; fi
  dir="$WORK/$name"
  mkdir -p "$dir"
  if [[ "${SOURCE:-head}" == worktree ]]; then
    cp -r "$ROOT/src" "$ROOT/tests" "$ROOT/pyproject.toml" "$dir/"
  else  # the committed code and tests: others' unfinished edits in a shared checkout do not leak in
    git -C "$ROOT" archive HEAD src tests pyproject.toml | tar -x -C "$dir"
  fi
  find "$dir" -name __pycache__ -prune -exec rm -rf {} +
  existing=""
  for t in $tests; do [[ -e "$dir/${t%%::*}" ]] && existing+="    $t"$'\n'; done
  only=""
  for f in $files; do only+="    $f"$'\n'; done
  # pyproject.toml has no [tool.mutmut], so mutmut reads setup.cfg (written only in the copy)
  cat > "$dir/setup.cfg" <<EOF
[mutmut]
source_paths = src/
only_mutate =
$only
pytest_add_cli_args_test_selection =
$existing    $DESELECT
process_isolation = forkserver
timeout_multiplier = 50
EOF
  echo "== $name: mutating $(echo $patterns | wc -w) function pattern(s) of $files" >&2
  # shellcheck disable=SC2086
  (cd "$dir" && RESUNETPP_DATA="${RESUNETPP_DATA:-$ROOT/../shared/data}" \
      "$PYTHON" -m mutmut run --max-children "$JOBS" $patterns > "$dir/mutmut.log" 2>&1) || {
    echo "mutmut failed for $name; see $dir/mutmut.log (KEEP=1 keeps it)" >&2; tail -20 "$dir/mutmut.log" >&2; exit 1; }
  (cd "$dir" && "$PYTHON" - "$name" "$patterns" >> "$SUMMARY" <<'EOF'
import fnmatch, json, pathlib, sys
from mutmut.stats import status_by_exit_code
name, patterns = sys.argv[1], sys.argv[2].split()
for meta in sorted(pathlib.Path("mutants").rglob("*.meta")):
    for key, code in json.loads(meta.read_text())["exit_code_by_key"].items():
        if any(fnmatch.fnmatch(key, p) for p in patterns):
            print(f"{name}\t{key}\t{status_by_exit_code[code]}")
EOF
  )
done

"$PYTHON" - "$SUMMARY" <<'EOF'
import collections, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
killed_states = {"killed", "timeout", "caught by type check", "segfault"}
per = collections.OrderedDict()
for group, key, status in rows:
    k, n = per.get(group, (0, 0))
    per[group] = (k + (status in killed_states), n + 1)
for group, key, status in rows:
    if status not in killed_states:
        print(f"  {status:10s} {key}")
for group, (k, n) in per.items():
    print(f"{group:18s} {k:4d}/{n:<4d} killed ({100 * k / max(n, 1):.1f}%)")
k = sum(v[0] for v in per.values())
n = sum(v[1] for v in per.values())
print(f"mutation score: {k}/{n} killed ({100 * k / max(n, 1):.1f}%)")
EOF
