#!/usr/bin/env bash
# Entrypoint of the training image (Dockerfile.train), used by compose.yaml and the k8s CronJob:
# train (resuming from RUN_DIR's checkpoints when a previous attempt was cut short), evaluate on the
# test split, then publish a new model version only through the export quality gate.
#
# Configuration, all by environment:
#   RUN_DIR (required)        run directory on the checkpoint volume, e.g. /runs/nightly
#   MODEL_BASE (/models)      TensorFlow Serving model base; versions go to MODEL_BASE/MODEL_NAME/<n>/
#   MODEL_NAME (cifar10)
#   TRAIN_DATASET (cifar10)   cifar10 | imagefolder | synthetic
#   TRAIN_DATA_DIR            local copy of the data (optional; CIFAR-10 is downloaded otherwise)
#   TRAIN_CONFIG (configs/default.yaml)  training profile
#   TRAIN_EPOCHS              overrides the profile's epochs (optional)
#   TRAIN_SET                 space-separated section.key=value overrides, each passed as --set
#   EXPORT_MIN_ACCURACY, EXPORT_MAX_REGRESSION, EXPORT_KEEP   quality gate and retention (optional)
#   EXPORT_SERVING_CONFIG     TF Serving's models.config as mounted here: EXPORT_KEEP never removes a
#                             version it serves, pins or labels (optional, but set it with EXPORT_KEEP)
#   PYTHON (python3)
# Exit status: that of the first step that fails; 3 means the quality gate rejected the model.
set -euo pipefail

: "${RUN_DIR:?set RUN_DIR to a run directory on the checkpoint volume, e.g. RUN_DIR=/runs/nightly}"
MODEL_BASE=${MODEL_BASE:-/models}
MODEL_NAME=${MODEL_NAME:-cifar10}
TRAIN_DATASET=${TRAIN_DATASET:-cifar10}
TRAIN_CONFIG=${TRAIN_CONFIG:-configs/default.yaml}
PYTHON=${PYTHON:-python3}

train_args=(train --dataset "$TRAIN_DATASET" --config "$TRAIN_CONFIG" --run-dir "$RUN_DIR" --resume)
if [[ -n "${TRAIN_DATA_DIR:-}" ]]; then train_args+=(--data-dir "$TRAIN_DATA_DIR"); fi
if [[ -n "${TRAIN_EPOCHS:-}" ]]; then train_args+=(--epochs "$TRAIN_EPOCHS"); fi
read -r -a overrides <<< "${TRAIN_SET:-}"
for kv in "${overrides[@]}"; do train_args+=(--set "$kv"); done

export_args=(export --run-dir "$RUN_DIR" --model-base "$MODEL_BASE" --model-name "$MODEL_NAME")
if [[ -n "${EXPORT_MIN_ACCURACY:-}" ]]; then export_args+=(--min-accuracy "$EXPORT_MIN_ACCURACY"); fi
if [[ -n "${EXPORT_MAX_REGRESSION:-}" ]]; then export_args+=(--max-regression "$EXPORT_MAX_REGRESSION"); fi
if [[ -n "${EXPORT_KEEP:-}" ]]; then export_args+=(--keep "$EXPORT_KEEP"); fi
if [[ -n "${EXPORT_SERVING_CONFIG:-}" ]]; then export_args+=(--serving-config "$EXPORT_SERVING_CONFIG"); fi

step() { echo "==> $(date -u +%FT%TZ) $*"; }

step "train: ${train_args[*]}"
"$PYTHON" -m trainer "${train_args[@]}"
step "evaluate: $RUN_DIR"
"$PYTHON" -m trainer evaluate --run-dir "$RUN_DIR"
step "export through the quality gate: ${export_args[*]}"
exec "$PYTHON" -m trainer "${export_args[@]}"
