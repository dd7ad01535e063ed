#!/usr/bin/env bash
# `make serve`: train a model if none is published yet, export it, then start the gateway.
# Each step says what it does and how long it took. Configuration (all optional):
#   RUN_DIR (runs/quick)  MODEL_BASE (models)  MODEL_NAME (cifar10)  HOST (127.0.0.1)  PORT (8080)
#   DATASET (cifar10; falls back to synthetic, loudly, when CIFAR-10 cannot be downloaded)
#   TRAIN_CONFIG (configs/quick.yaml)  WORKERS (gunicorn workers, 2)
#   GATEWAY_ADMIN_BIND (unset: /metrics and /readyz on PORT; set for you to 127.0.0.1:9090 when HOST is
#   not a loopback address, so serving to the network does not publish them; see docs/deploy.md)
# Slow clients cannot hold its threads (serving/workers.py); nginx in front is for the shipped stacks.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
RUN_DIR=${RUN_DIR:-runs/quick}
MODEL_BASE=${MODEL_BASE:-models}
MODEL_NAME=${MODEL_NAME:-cifar10}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8080}
DATASET=${DATASET:-cifar10}
TRAIN_CONFIG=${TRAIN_CONFIG:-configs/quick.yaml}
export KERAS_BACKEND=${KERAS_BACKEND:-tensorflow}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}  # TensorFlow's C++ INFO and WARNING lines

has_nvidia_gpu() {
  # A driver, a device node, or an NVIDIA card on the PCI bus (vendor 0x10de), even one without a
  # working driver: then TensorFlow's CUDA messages may be the only sign of what is wrong.
  [ -e /proc/driver/nvidia/version ] || compgen -G '/dev/nvidia[0-9]*' >/dev/null \
    || grep -qsx 0x10de /sys/bus/pci/devices/*/vendor
}

drop_cpu_cuda_noise() {
  # Every TensorFlow process (train, export, each gateway worker) logs at import that it found no
  # CUDA driver, through absl before any log level applies (TF_CPP_MIN_LOG_LEVEL does not reach
  # these). On a machine with no NVIDIA GPU that is noise: drop exactly those lines, nothing else.
  # INT and TERM are ignored so that Ctrl-C or a stop signal lets the gateway's shutdown lines through;
  # the filter ends when the last process writing to it does.
  trap '' INT TERM
  grep --line-buffered -Ev \
    -e '^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$' \
    -e '\] Could not find cuda drivers on your machine, GPU will not be used\.$' \
    -e '\] failed call to cuInit: '
}

if ! has_nvidia_gpu; then
  exec 2> >(drop_cpu_cuda_noise >&2)
fi

step() { STEP_NAME=$1; STEP_START=$(date +%s); echo "==> $1"; }
done_step() { echo "    done: $STEP_NAME in $(( $(date +%s) - STEP_START ))s"; }

published_version() {
  # The highest all-digit version directory holding a saved_model.pb: what TensorFlow Serving would load.
  local dir="$MODEL_BASE/$MODEL_NAME"
  [ -d "$dir" ] || return 0
  find "$dir" -mindepth 2 -maxdepth 2 -name saved_model.pb -printf '%h\n' 2>/dev/null \
    | xargs -r -n1 basename | grep -E '^[0-9]+$' | sort -n | tail -n 1
}

version=$(published_version)
if [ -n "$version" ]; then
  echo "==> model $MODEL_NAME version $version is already published under $MODEL_BASE: skipping training"
else
  if [ ! -f "$RUN_DIR/model.keras" ]; then
    step "train ($DATASET, $TRAIN_CONFIG) into $RUN_DIR"
    if ! "$PY" -m trainer train --dataset "$DATASET" --config "$TRAIN_CONFIG" --run-dir "$RUN_DIR" --resume; then
      if [ "$DATASET" = cifar10 ]; then
        echo "!!! CIFAR-10 could not be loaded (offline?). Training on SYNTHETIC shapes instead so the" >&2
        echo "!!! service can start; its predictions mean nothing for photos. Set DATASET or --data-dir" >&2
        echo "!!! (see README) to train on real data." >&2
        rm -rf "$RUN_DIR"
        "$PY" -m trainer train --dataset synthetic --config "$TRAIN_CONFIG" --run-dir "$RUN_DIR"
      else
        exit 1
      fi
    fi
    done_step
  fi
  step "export $RUN_DIR to $MODEL_BASE/$MODEL_NAME"
  "$PY" -m trainer export --run-dir "$RUN_DIR" --model-base "$MODEL_BASE" --model-name "$MODEL_NAME"
  done_step
fi

step "start the gateway on http://$HOST:$PORT (embedded model; Ctrl-C stops it)"
export GATEWAY_MODEL_BASE_PATH="$MODEL_BASE" GATEWAY_MODEL_NAME="$MODEL_NAME"
export PROMETHEUS_MULTIPROC_DIR=${PROMETHEUS_MULTIPROC_DIR:-$(mktemp -d -t cifar10-metrics.XXXXXX)}
case "$HOST" in
  127.*|localhost|::1) ;;
  *)
    if [ -z "${GATEWAY_ADMIN_BIND:-}" ]; then
      export GATEWAY_ADMIN_BIND=127.0.0.1:9090
      echo "    /metrics and /readyz on http://$GATEWAY_ADMIN_BIND only (HOST=$HOST is not loopback)"
    fi
    ;;
esac
exec "$(dirname "$PY")/gunicorn" -c serving/gunicorn.conf.py --bind "$HOST:$PORT" --workers "${WORKERS:-2}" \
  'serving.app:create_app()'
