"""gunicorn settings for the gateway: `gunicorn -c serving/gunicorn.conf.py 'serving.app:create_app()'`.

Environment: GATEWAY_BIND (127.0.0.1:8080), GATEWAY_WORKERS (2), GATEWAY_THREADS (8); gunicorn's
own flags (--bind, --workers) override them; GATEWAY_ADMIN_BIND adds the admin listener. The app is
not preloaded: each worker builds it after the fork, so TensorFlow, the model poller thread and gRPC
channels are per worker.
"""

import os
import shutil
import tempfile

bind = os.environ.get("GATEWAY_BIND", "127.0.0.1:8080")
workers = int(os.environ.get("GATEWAY_WORKERS", "2"))
# Threads let one worker overlap request parsing with model calls (TensorFlow releases the GIL).
# gthread, except that each request is read whole in the worker's event loop before a thread gets it,
# so slow clients (a header byte every few seconds) cannot hold the threads (serving/workers.py).
worker_class = "serving.workers.BufferedThreadWorker"
threads = int(os.environ.get("GATEWAY_THREADS", "8"))
timeout = 120  # a worker imports TensorFlow and loads the model before it first reports alive
graceful_timeout = 20
# gunicorn 23+ opens a control socket at one fixed path per user; several gateways on one host (tests,
# benchmarks, replicas) would take it from each other, and nothing here uses it.
control_socket_disable = True
accesslog = os.environ.get("GATEWAY_ACCESS_LOG") or None  # e.g. "-" for stdout; off by default for speed
# gunicorn's default format plus the response's X-Request-ID (serving/request_id.py), so an access
# line joins up with the gateway's error log line and the id a client reports.
access_log_format = (
    '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" request_id=%({x-request-id}o)s'
)

# prometheus-client multiprocess mode needs a directory shared by the workers, set before any
# worker imports prometheus_client; start from an empty one so dead workers' counts do not linger.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gateway-metrics-")


def on_starting(server) -> None:  # a gunicorn server hook
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory, exist_ok=True)
    _add_admin_listener(server)


def _add_admin_listener(server) -> None:
    # GATEWAY_ADMIN_BIND: a second listener for /metrics, /readyz and /healthz (serving/admin.py).
    # Added here, before gunicorn opens its sockets, because --bind on the command line (scripts/serve.sh,
    # the test launcher) replaces the `bind` setting of this file.
    from serving.config import Settings

    admin = Settings.from_env().admin_bind
    if admin is None or admin in server.cfg.bind:
        return
    admin_port = admin.rsplit(":", 1)[1]
    if any(b.rsplit(":", 1)[-1] == admin_port for b in server.cfg.bind):
        # serving/admin.py tells the ports apart by number: they must differ.
        raise RuntimeError(
            f"GATEWAY_ADMIN_BIND={admin} uses the port of --bind {server.cfg.bind}: pick another port"
        )
    server.cfg.set("bind", [*server.cfg.bind, admin])


def child_exit(server, worker) -> None:  # a gunicorn server hook
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def post_fork(server, worker) -> None:  # a gunicorn server hook
    # Python's cyclic garbage collector off while the worker builds the app (post_worker_init turns
    # it back on): importing TensorFlow and loading the model create millions of objects, and every
    # full collection on the way traverses all of them, ~9 collections and ~1 s of a worker's start
    # on 2 cores. What those steps leave in cycles is collected once the collector runs again.
    import gc

    gc.disable()
    # Route the gateway's own logs (model loaded, version swapped, unexpected errors) through
    # gunicorn's error log, so --log-level and --error-logfile apply to them too. post_fork runs
    # before the worker builds the app, so the first model load is logged as well.
    import logging

    gateway_log = logging.getLogger("serving")
    gateway_log.handlers = list(worker.log.error_log.handlers)
    gateway_log.setLevel(worker.log.error_log.level)
    gateway_log.propagate = False


def post_worker_init(worker) -> None:  # a gunicorn server hook: the app is built
    import gc

    gc.enable()
