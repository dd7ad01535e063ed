#!/usr/bin/env bash
# The prepared GPU training benchmark (benchmarks/gpu_train.py) on a lent GPU machine, which has
# JAX but no Keras and no network: everything it needs travels with the working tree, whose carried
# paths may hold at most 64 MiB per call (/work/.library/device/README.md).
#
# What travels, and why in several calls:
#   .whl/        Keras (the version of this checkout's venv) and the two dependencies the machine
#                lacks (namex, optree): about 2 MiB. The machine's JAX, NumPy, h5py, SciPy, ... are used.
#   .gpu-data/   CIFAR-10 (cifar-10-binary.tar.gz, 162 MiB: the machine cannot download it and it
#                does not fit one call) split into parts of CHUNK_MIB (55) MiB, plus SHA256SUMS.
#                Each call carries one part; `stage` moves it to /tmp/gpu-bench/ on the machine,
#                which keeps it only while the machine stays warm (30 s after a call). So the calls
#                must follow each other at once; if the machine was given back in between, `run`
#                names the missing parts and exits 3: stage them again.
#
# Here (a machine with network, in the repository root):
#   bash scripts/gpu-bench.sh prepare [cifar-10-binary.tar.gz]
#       downloads the wheels into .whl/ and splits the archive (the trainer's download cache when
#       not given; downloaded there when missing) into .gpu-data/, then prints the device calls.
# On the lent machine (device tool `run`, one call each, back to back; `prepare` prints them):
#   bash scripts/gpu-bench.sh stage     carry: .gpu-data/SHA256SUMS .gpu-data/<part i>   (all but the last)
#   bash scripts/gpu-bench.sh run       carry: .whl .gpu-data/SHA256SUMS .gpu-data/<last part>
#       stages the carried part, reassembles and checks the archive, installs the wheels into
#       /tmp/gpu-bench/site, and runs benchmarks/gpu_train.py within BUDGET_S seconds (450: a call
#       may run 10 minutes); it writes benchmarks/results/gpu_train.json and copies it and the log
#       to $OUT. Copy the returned gpu_train.json to benchmarks/results/ here and run
#       `python -m benchmarks.report` for docs/benchmarks.md.
# A CIFAR-10 copy already on the machine can be named instead of staging: CIFAR10_DIR=/path run.
#
# Environment: CHUNK_MIB (55; CHUNK_BYTES overrides it, for tests), BUDGET_S (450), SEEDS (5), DEFAULT_SEEDS (1), STAGE_DIR
# (/tmp/gpu-bench), PYTHON (python3 there; .venv/bin/python for `prepare` here), GPU_BENCH_ARGS
# (extra arguments for benchmarks/gpu_train.py, e.g. "--set train.epochs=1" for a smoke run).
set -euo pipefail

WHEELS=.whl
DATA=.gpu-data
ARCHIVE_NAME=cifar-10-binary.tar.gz
CHUNK_MIB=${CHUNK_MIB:-55}
BUDGET_S=${BUDGET_S:-450}
SEEDS=${SEEDS:-5}
DEFAULT_SEEDS=${DEFAULT_SEEDS:-1}
STAGE_DIR=${STAGE_DIR:-/tmp/gpu-bench}
CARRY_LIMIT_MIB=63  # the tool's 64 MiB per call, less a margin

die() { echo "gpu-bench: $*" >&2; exit "${2:-1}"; }
mib() { echo $(( ($1 + 1048575) / 1048576 )); }

prepare() {
  local py=${PYTHON:-.venv/bin/python}
  local archive=${1:-}
  [[ -x "$py" ]] || die "no Python at $py: make venv first, or set PYTHON"
  # The same Keras as the checkout's tests use; the others are what that Keras needs beyond the
  # machine's packages (KINDS.md lists them).
  local keras_version namex_version optree_version
  keras_version=$("$py" -c 'import keras; print(keras.__version__)')
  namex_version=$("$py" -c 'import importlib.metadata as m; print(m.version("namex"))')
  optree_version=$("$py" -c 'import importlib.metadata as m; print(m.version("optree"))')
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" \
    "keras==$keras_version" "namex==$namex_version" "optree==$optree_version"

  if [[ -z "$archive" ]]; then
    archive=$("$py" -c 'from trainer.data import cifar10; print(cifar10.default_cache_dir() / cifar10.ARCHIVE_NAME)')
    if [[ ! -f "$archive" ]]; then
      echo "downloading CIFAR-10 into the trainer's cache ($archive)"
      "$py" -c 'from trainer.data import cifar10; cifar10.load()' >/dev/null
    fi
  fi
  [[ -f "$archive" ]] || die "$archive does not exist: pass the path of cifar-10-binary.tar.gz"
  split_archive "$archive"
  plan
}

split_archive() {
  rm -rf "$DATA" && mkdir -p "$DATA"
  split -b "${CHUNK_BYTES:-$((CHUNK_MIB * 1048576))}" -d -a 2 "$1" "$DATA/$ARCHIVE_NAME.part-"
  # The whole archive's checksum, then the parts': `run` checks both after reassembling.
  (cd "$(dirname "$1")" && sha256sum "$(basename "$1")") | sed "s/  .*/  $ARCHIVE_NAME/" > "$DATA/SHA256SUMS"
  (cd "$DATA" && sha256sum "$ARCHIVE_NAME".part-* >> SHA256SUMS)
}

plan() {
  local parts=("$DATA/$ARCHIVE_NAME".part-*)
  local tree wheels last
  # What travels besides the carried paths: tracked and untracked-but-not-ignored files.
  tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null \
         | awk '{s += $1} END {print s + 0}')
  wheels=$(du -sb "$WHEELS" | cut -f1)
  last=$(stat -c %s "${parts[-1]}")
  local biggest=0 p
  for p in "${parts[@]}"; do (( $(stat -c %s "$p") > biggest )) && biggest=$(stat -c %s "$p"); done
  echo "working tree $(mib "$tree") MiB, wheels $(mib "$wheels") MiB, ${#parts[@]} parts of at most $(mib "$biggest") MiB"
  (( $(mib $((tree + biggest))) <= CARRY_LIMIT_MIB )) || die "a staging call would carry more than $CARRY_LIMIT_MIB MiB: lower CHUNK_MIB"
  (( $(mib $((tree + wheels + last))) <= CARRY_LIMIT_MIB )) || die "the run call would carry more than $CARRY_LIMIT_MIB MiB: lower CHUNK_MIB"
  echo "device calls, back to back (the machine keeps staged parts only while warm):"
  local i
  for (( i = 0; i < ${#parts[@]} - 1; i++ )); do
    echo "  run command='bash scripts/gpu-bench.sh stage' carry=[\"$DATA/SHA256SUMS\", \"${parts[i]}\"] timeout_s=120"
  done
  echo "  run command='bash scripts/gpu-bench.sh run' carry=[\"$WHEELS\", \"$DATA/SHA256SUMS\", \"${parts[-1]}\"] timeout_s=590"
}

stage() {
  mkdir -p "$STAGE_DIR/parts"
  local p
  shopt -s nullglob
  for p in "$DATA/$ARCHIVE_NAME".part-*; do cp "$p" "$STAGE_DIR/parts/" && echo "staged $(basename "$p")"; done
  [[ -f "$DATA/SHA256SUMS" ]] && cp "$DATA/SHA256SUMS" "$STAGE_DIR/parts/"
  echo "staged so far: $(cd "$STAGE_DIR/parts" && ls | tr '\n' ' ')"
}

# The CIFAR-10 folder for --data-dir: CIFAR10_DIR, or the archive reassembled from the staged parts.
assemble() {
  if [[ -n "${CIFAR10_DIR:-}" ]]; then echo "$CIFAR10_DIR"; return; fi
  local sums="$STAGE_DIR/parts/SHA256SUMS" out="$STAGE_DIR/data"
  [[ -f "$sums" ]] || die "no staged parts and no CIFAR10_DIR: carry $DATA/SHA256SUMS and the parts (prepare prints the calls)" 3
  local missing=() name
  while read -r _ name; do
    [[ "$name" == "$ARCHIVE_NAME" || -f "$STAGE_DIR/parts/$name" ]] || missing+=("$name")
  done < "$sums"
  (( ${#missing[@]} == 0 )) || die "parts not staged on this machine: ${missing[*]} (the machine may have been given back between calls: stage them again, then run)" 3
  mkdir -p "$out"
  (cd "$STAGE_DIR/parts" && grep "\.part-" SHA256SUMS | sha256sum -c --quiet) || die "a staged part is corrupt: stage it again" 3
  cat "$STAGE_DIR/parts/$ARCHIVE_NAME".part-* > "$out/$ARCHIVE_NAME"
  (cd "$out" && grep -v "\.part-" "$STAGE_DIR/parts/SHA256SUMS" | sha256sum -c --quiet) || die "the reassembled archive does not match its checksum" 3
  echo "$out"
}

run() {
  local py=${PYTHON:-python3}
  stage >&2
  local data_dir
  data_dir=$(assemble)
  local site="$STAGE_DIR/site"
  shopt -s nullglob
  local wheels=("$WHEELS"/*.whl)
  (( ${#wheels[@]} )) || die "no wheels in $WHEELS/: run 'bash scripts/gpu-bench.sh prepare' here and carry $WHEELS"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" KERAS_BACKEND=jax PYTHONUNBUFFERED=1
  "$py" -c 'import jax, keras; print("keras", keras.__version__, "jax", jax.__version__, jax.devices())'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  local out=benchmarks/results/gpu_train.json status=0
  read -r -a extra <<< "${GPU_BENCH_ARGS:-}"
  # The benchmark stops starting runs past BUDGET_S; the timeout is the backstop, and the results
  # file keeps every finished run even then.
  timeout --signal=TERM $((BUDGET_S + 90)) "$py" -m benchmarks.gpu_train --data-dir "$data_dir" \
    --seeds "$SEEDS" --default-seeds "$DEFAULT_SEEDS" --budget-s "$BUDGET_S" --out "$out" "${extra[@]}" \
    2>&1 | tee "$STAGE_DIR/gpu_train.log" || status=$?
  if [[ -n "${OUT:-}" ]]; then
    cp "$STAGE_DIR/gpu_train.log" "$OUT/" || true
    [[ -f "$out" ]] && cp "$out" "$OUT/"
  fi
  if (( status == 124 )); then
    # Not 124: the device tool reads that as its own time limit. The results file keeps what finished.
    echo "gpu-bench: the benchmark ran past BUDGET_S + 90 s and was stopped; partial results" >&2
    status=4
  fi
  return "$status"
}

case "${1:-}" in
  prepare) shift; prepare "$@" ;;
  split) shift; [[ -f "${1:-}" ]] || die "usage: $0 split ARCHIVE"; split_archive "$1" ;;
  plan) plan ;;
  stage) stage ;;
  assemble) assemble ;;
  run) run ;;
  *) die "usage: $0 prepare [ARCHIVE] | plan | stage | run   (see the comment at the top of this file)" 2 ;;
esac
