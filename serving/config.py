"""Gateway settings, read from the environment once, by the app factory (never at import time)."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from contract.signatures import MAX_PIXELS, SERVING_DEFAULT
from serving.backends.litert import AUTO, RUNTIMES
from serving.backends.litert_cache import default_cache_dir
from serving.batching import BatchingParameters

T = TypeVar("T")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MIB = 1024 * 1024


class ConfigError(ValueError):
    """A GATEWAY_* variable holds a value the gateway cannot use; the message names it."""


@dataclass(frozen=True)
class Settings:
    model_base_path: Path = Path("models")
    model_name: str = "cifar10"
    # host:port of TensorFlow Serving's gRPC API; None selects the embedded backend.
    tfserving_address: str | None = None
    tfserving_signature: str = SERVING_DEFAULT
    deadline_s: float = 5.0
    max_images: int = 64
    max_upload_bytes: int = 20 * MIB
    # Per-image cap on declared pixels, checked before decoding (serving/images.py). 25 Mpx takes the
    # default output of today's phones (12-24 Mpx; their 48-200 Mpx modes are opt-in) and bounds one
    # decode at about 25 Mpx x 10 bytes (docs/deploy.md, "Memory"); the model sees 32x32 anyway.
    max_pixels: int = MAX_PIXELS  # 25_000_000
    # Budgets per request (serving/uploads.py, serving/deadline.py, serving/explain.py): declared pixels
    # of all its images together, an end-to-end deadline (upload decoding + backend call), and
    # /v1/explain's own image cap and concurrent calls per worker (a backward pass + a PNG per image).
    max_request_pixels: int = 100_000_000
    request_deadline_s: float = 10.0
    max_explain_images: int = 8
    explain_concurrency: int = 2
    # Full-size decodes at once per worker (GATEWAY_DECODE_CONCURRENCY): what bounds a pod's memory,
    # workers x this x the worst decode (docs/deploy.md, "Memory"); more would not be faster on the
    # 1-CPU pod anyway. Others wait for a slot within their deadline.
    decode_concurrency: int = 2
    poll_interval_s: float = 2.0
    # Cross-request batching in the embedded backend (serving/batching.py, TF Serving's names).
    batching: BatchingParameters = field(default_factory=BatchingParameters)
    # What runs the embedded model's predictions (serving/backends/litert.py): "litert" converts each
    # version's signature to LiteRT (XNNPACK) at load and uses it once it agrees with the SavedModel,
    # else TensorFlow; "tensorflow" always calls the SavedModel's signature. model_threads: LiteRT's
    # threads per model, None = the CPUs this process may use, at most 4.
    runtime: str = AUTO
    model_threads: int | None = None
    # Where workers keep LiteRT conversions, so a machine converts each version once
    # (serving/backends/litert_cache.py); GATEWAY_LITERT_CACHE_DIR=off converts in every worker.
    litert_cache_dir: Path | None = field(default_factory=default_cache_dir)
    # API keys and rate limits (serving/auth.py, serving/ratelimit.py, docs/deploy.md); all off by
    # default, so `make serve` on 127.0.0.1 needs no key. Read by _access() below.
    api_keys_file: Path | None = None  # GATEWAY_API_KEYS_FILE: `name:sha256hex` lines
    rate_limit: str | None = None  # GATEWAY_RATE_LIMIT: Flask-Limiter syntax, "20/second;600/minute"
    rate_limit_storage: str = "memory://"  # GATEWAY_RATE_LIMIT_STORAGE: memory:// or redis://host:6379
    # GATEWAY_TRUSTED_PROXIES: addresses whose X-Forwarded-For is believed (the proxy in front).
    trusted_proxies: tuple[IPNetwork, ...] = ()
    # TLS to TF Serving (GATEWAY_TFSERVING_TLS_CA; mutual with _CERT and _KEY): PEM files, read at start.
    tfserving_tls_ca: Path | None = None
    tfserving_tls_cert: Path | None = None
    tfserving_tls_key: Path | None = None
    # Overload control towards TF Serving (serving/backends/tfserving.py, contract/overload.py): the
    # breaker opens after GATEWAY_BREAKER_FAILURES consecutive failed calls for GATEWAY_BREAKER_OPEN_S;
    # retries may add at most GATEWAY_RETRY_BUDGET_RATIO of the calls (plus a small reserve).
    breaker_failures: int = 5
    breaker_open_s: float = 2.0
    retry_budget_ratio: float = 0.1
    # Slow clients (serving/workers.py, nginx's directives of the same names): the request head must
    # arrive within client_header_timeout_s in total, the body may pause at most client_body_timeout_s
    # between reads, writing the answer may take at most client_send_timeout_s.
    client_header_timeout_s: float = 10.0
    client_body_timeout_s: float = 10.0
    client_send_timeout_s: float = 10.0
    # GATEWAY_ADMIN_BIND (host:port): /metrics and /readyz answer only there (serving/admin.py), /healthz
    # on both; None keeps them on the public port (`make serve` on 127.0.0.1).
    admin_bind: str | None = None
    # OpenTelemetry tracing (serving/tracing.py, the `tracing` extra; docs/deploy.md, "Tracing"): None =
    # off (the default); on with GATEWAY_OTEL=1 or OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_SERVICE_NAME: where
    # spans go, "otlp-http", "otlp-grpc", "console" or "none" (from OTEL_TRACES_EXPORTER and
    # OTEL_EXPORTER_OTLP_PROTOCOL).
    tracing_exporter: str | None = None
    # Prediction sampling (serving/sampling.py; docs/deploy.md, "Prediction sampling and drift"): the
    # share of /v1/predict requests whose 32x32 inputs and answers are kept in GATEWAY_SAMPLE_DIR for
    # relabelling and drift checks. 0 (the default, `make serve`) keeps nothing and creates no file.
    sample_rate: float = 0.0
    sample_dir: Path | None = None
    sample_max_records: int = 10_000  # images kept, newest first (about 4.2 KB each on disk)
    sample_retention_hours: float = 72.0  # older records are deleted

    @property
    def admin_port(self) -> int | None:
        return None if self.admin_bind is None else int(self.admin_bind.rsplit(":", 1)[1])

    @property
    def backend_kind(self) -> str:
        return "tfserving" if self.tfserving_address else "embedded"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        d = cls()

        def read(name: str, parse: Callable[[str], T], default: T, rule: str, ok: Callable[[T], bool]) -> T:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = parse(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r} is not valid: expected {rule}") from None
            if not ok(value):
                raise ConfigError(f"{name}={raw!r} is not valid: expected {rule}")
            return value

        address = env.get("GATEWAY_TFSERVING_ADDRESS", "").strip() or None
        if address is not None and (":" not in address or not address.rsplit(":", 1)[1].isdigit()):
            raise ConfigError(
                f"GATEWAY_TFSERVING_ADDRESS={address!r} is not valid: expected host:port of the gRPC API, "
                "e.g. localhost:8500 (leave it empty for the embedded model)"
            )
        name = env.get("GATEWAY_MODEL_NAME", "").strip() or d.model_name
        if "/" in name or name in (".", ".."):
            raise ConfigError(f"GATEWAY_MODEL_NAME={name!r} is not valid: expected a plain directory name")
        return cls(
            model_base_path=Path(env.get("GATEWAY_MODEL_BASE_PATH", "").strip() or d.model_base_path),
            model_name=name,
            tfserving_address=address,
            tfserving_signature=env.get("GATEWAY_TFSERVING_SIGNATURE", "").strip() or d.tfserving_signature,
            **_tfserving_tls(env),
            breaker_failures=read(
                "GATEWAY_BREAKER_FAILURES", int, d.breaker_failures, "an integer >= 1", lambda v: v >= 1
            ),
            breaker_open_s=read(
                "GATEWAY_BREAKER_OPEN_S", float, d.breaker_open_s, "seconds > 0, e.g. 2", lambda v: v > 0
            ),
            retry_budget_ratio=read(
                "GATEWAY_RETRY_BUDGET_RATIO",
                float,
                d.retry_budget_ratio,
                "a fraction within 0..1, e.g. 0.1 (0 turns retries off)",
                lambda v: 0 <= v <= 1,
            ),
            deadline_s=read(
                "GATEWAY_DEADLINE_S", float, d.deadline_s, "seconds > 0, e.g. 5", lambda v: v > 0
            ),
            max_images=read("GATEWAY_MAX_IMAGES", int, d.max_images, "an integer >= 1", lambda v: v >= 1),
            max_upload_bytes=read(
                "GATEWAY_MAX_UPLOAD_BYTES",
                int,
                d.max_upload_bytes,
                "bytes as an integer >= 1024",
                lambda v: v >= 1024,
            ),
            max_pixels=read(
                "GATEWAY_MAX_PIXELS",
                int,
                d.max_pixels,
                "pixels per image as an integer >= 1024",
                lambda v: v >= 1024,
            ),
            max_request_pixels=read(
                "GATEWAY_MAX_REQUEST_PIXELS",
                int,
                d.max_request_pixels,
                "pixels per request (all images together) as an integer >= 1024",
                lambda v: v >= 1024,
            ),
            request_deadline_s=read(
                "GATEWAY_REQUEST_DEADLINE_S",
                float,
                d.request_deadline_s,
                "seconds > 0 for a whole request, e.g. 10",
                lambda v: v > 0,
            ),
            max_explain_images=read(
                "GATEWAY_MAX_EXPLAIN_IMAGES", int, d.max_explain_images, "an integer >= 1", lambda v: v >= 1
            ),
            explain_concurrency=read(
                "GATEWAY_EXPLAIN_CONCURRENCY",
                int,
                d.explain_concurrency,
                "concurrent /v1/explain calls per worker as an integer >= 1",
                lambda v: v >= 1,
            ),
            decode_concurrency=read(
                "GATEWAY_DECODE_CONCURRENCY",
                int,
                d.decode_concurrency,
                "full-size image decodes at once per worker as an integer >= 1",
                lambda v: v >= 1,
            ),
            poll_interval_s=read(
                "GATEWAY_POLL_INTERVAL_S", float, d.poll_interval_s, "seconds > 0, e.g. 2", lambda v: v > 0
            ),
            batching=_batching(read, d.batching),
            runtime=read(
                "GATEWAY_RUNTIME",
                lambda raw: raw.lower(),
                d.runtime,
                "auto (the default: LiteRT where a version converts, TensorFlow for large batches where "
                "it measured cheaper at load), litert (LiteRT only) or tensorflow",
                lambda v: v in RUNTIMES,
            ),
            model_threads=read(
                "GATEWAY_MODEL_THREADS",
                int,
                d.model_threads,
                "LiteRT threads per model as an integer >= 1 (empty: the CPUs available, at most 4)",
                lambda v: v >= 1,
            ),
            litert_cache_dir=read(
                "GATEWAY_LITERT_CACHE_DIR",
                lambda raw: None if raw.lower() == "off" else Path(raw),
                d.litert_cache_dir,
                "a directory for LiteRT conversions, or off",
                lambda v: True,
            ),
            **_access(env),
            **_slow_clients(read, d),
            admin_bind=_admin_bind(env),
            tracing_exporter=_tracing_exporter(env),
            **_sampling(read, env, d),
        )


def _slow_clients(read: Callable[..., Any], d: Settings) -> dict[str, float]:
    """GATEWAY_CLIENT_HEADER_TIMEOUT_S, GATEWAY_CLIENT_BODY_TIMEOUT_S, GATEWAY_CLIENT_SEND_TIMEOUT_S."""
    out = {}
    for field_name in ("client_header_timeout_s", "client_body_timeout_s", "client_send_timeout_s"):
        out[field_name] = read(
            f"GATEWAY_{field_name.upper()}", float, getattr(d, field_name), "seconds > 0, e.g. 10",
            lambda v: v > 0,
        )  # fmt: skip
    return out


def _sampling(read: Callable[..., Any], env: Mapping[str, str], d: Settings) -> dict[str, Any]:
    """GATEWAY_SAMPLE_RATE, GATEWAY_SAMPLE_DIR, GATEWAY_SAMPLE_MAX_RECORDS, GATEWAY_SAMPLE_RETENTION_HOURS."""
    rate = read(
        "GATEWAY_SAMPLE_RATE", float, d.sample_rate,
        "a share of requests within 0..1, e.g. 0.01 (0 turns sampling off)", lambda v: 0 <= v <= 1,
    )  # fmt: skip
    raw_dir = env.get("GATEWAY_SAMPLE_DIR", "").strip()
    if rate > 0 and not raw_dir:
        # Stored inputs are users' images: where they go is never left to a default.
        raise ConfigError(
            f"GATEWAY_SAMPLE_DIR is not set but GATEWAY_SAMPLE_RATE={rate:g} asks to keep requests: set "
            "GATEWAY_SAMPLE_DIR to a writable directory for the sample, or GATEWAY_SAMPLE_RATE=0"
        )
    return {
        "sample_rate": rate,
        "sample_dir": Path(raw_dir) if raw_dir else None,
        "sample_max_records": read(
            "GATEWAY_SAMPLE_MAX_RECORDS", int, d.sample_max_records, "an integer >= 1 (images kept)",
            lambda v: v >= 1,
        ),
        "sample_retention_hours": read(
            "GATEWAY_SAMPLE_RETENTION_HOURS", float, d.sample_retention_hours,
            "hours > 0 a record is kept, e.g. 72", lambda v: v > 0,
        ),
    }  # fmt: skip


_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")
# Setting any of these (the OpenTelemetry SDK's own variables) asks for tracing, as it does for
# applications run under opentelemetry-instrument.
_OTEL_SWITCHES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SERVICE_NAME")


def _tracing_exporter(env: Mapping[str, str]) -> str | None:
    """GATEWAY_OTEL and the standard OTEL_* variables: None (tracing off) or where spans go."""
    switch = env.get("GATEWAY_OTEL", "").strip().lower()
    if switch and switch not in _TRUE + _FALSE:
        raise ConfigError(
            f"GATEWAY_OTEL={switch!r} is not valid: expected 1 (trace with OpenTelemetry) or 0 (do not, "
            "even when OTEL_* variables are set)"
        )
    if switch in _FALSE or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if switch not in _TRUE and not any(env.get(name, "").strip() for name in _OTEL_SWITCHES):
        return None
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
    if exporter in ("console", "none"):
        return exporter
    if exporter != "otlp":
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER={exporter!r} is not valid for the gateway: expected one of otlp (the "
            "default), console or none"
        )
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = env.get(name, "").strip().lower()
        if protocol:
            if protocol not in ("http/protobuf", "grpc"):
                raise ConfigError(
                    f"{name}={protocol!r} is not valid: expected http/protobuf (the default) or grpc"
                )
            return "otlp-grpc" if protocol == "grpc" else "otlp-http"
    return "otlp-http"


def _admin_bind(env: Mapping[str, str]) -> str | None:
    """GATEWAY_ADMIN_BIND: host:port of the admin listener gunicorn adds (serving/gunicorn.conf.py)."""
    raw = env.get("GATEWAY_ADMIN_BIND", "").strip()
    if not raw:
        return None
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"GATEWAY_ADMIN_BIND={raw!r} is not valid: expected host:port of the admin listener, e.g. "
            "127.0.0.1:9090 (0.0.0.0:9090 in a pod, for probes and Prometheus); leave it empty to keep "
            "/metrics and /readyz on the public port"
        )
    return raw


def _batching(read: Callable[..., Any], d: BatchingParameters) -> BatchingParameters:
    """GATEWAY_MAX_BATCH_SIZE, GATEWAY_BATCH_TIMEOUT_MICROS, GATEWAY_ALLOWED_BATCH_SIZES,
    GATEWAY_MAX_ENQUEUED_BATCHES, GATEWAY_NUM_BATCH_THREADS: TF Serving's batching parameters."""

    def sizes(raw: str) -> tuple[int, ...]:
        return tuple(int(part) for part in raw.replace(" ", "").split(",") if part)

    def positive(v: int) -> bool:
        return v >= 1

    max_batch_size = read("GATEWAY_MAX_BATCH_SIZE", int, d.max_batch_size, "an integer >= 1", positive)
    allowed = read(
        "GATEWAY_ALLOWED_BATCH_SIZES",
        sizes,
        None,
        "increasing sizes separated by commas, ending with GATEWAY_MAX_BATCH_SIZE, e.g. 8,16,32,64",
        lambda v: True,
    )
    if allowed is None:
        allowed = d.allowed_batch_sizes
    try:
        return BatchingParameters(
            max_batch_size=max_batch_size,
            batch_timeout_micros=read(
                "GATEWAY_BATCH_TIMEOUT_MICROS",
                int,
                d.batch_timeout_micros,
                "an integer >= 0",
                lambda v: v >= 0,
            ),
            allowed_batch_sizes=allowed,
            max_enqueued_batches=read(
                "GATEWAY_MAX_ENQUEUED_BATCHES", int, d.max_enqueued_batches, "an integer >= 1", positive
            ),
            num_batch_threads=read(
                "GATEWAY_NUM_BATCH_THREADS", int, d.num_batch_threads, "an integer >= 1", positive
            ),
        )
    except ValueError as error:
        raise ConfigError(f"GATEWAY_ALLOWED_BATCH_SIZES / GATEWAY_MAX_BATCH_SIZE: {error}") from None


def _access(env: Mapping[str, str]) -> dict[str, Any]:
    """GATEWAY_API_KEYS_FILE, GATEWAY_RATE_LIMIT, GATEWAY_RATE_LIMIT_STORAGE, GATEWAY_TRUSTED_PROXIES."""
    import limits
    from limits.storage import SCHEMES

    out: dict[str, Any] = {}
    keys_file = env.get("GATEWAY_API_KEYS_FILE", "").strip()
    if keys_file:
        # The file itself is read (and re-read on rotation) by serving/auth.py, which names this
        # variable when it is missing or malformed.
        out["api_keys_file"] = Path(keys_file)
    rate_limit = env.get("GATEWAY_RATE_LIMIT", "").strip()
    if rate_limit:
        try:
            limits.parse_many(rate_limit)
        except ValueError:
            raise ConfigError(
                f"GATEWAY_RATE_LIMIT={rate_limit!r} is not valid: expected limits such as "
                "'20/second;600/minute' (COUNT/second|minute|hour|day, separated by ';')"
            ) from None
        out["rate_limit"] = rate_limit
    storage = env.get("GATEWAY_RATE_LIMIT_STORAGE", "").strip()
    if storage:
        scheme = storage.split("://", 1)[0] if "://" in storage else ""
        if scheme not in SCHEMES or scheme.startswith("async+"):
            raise ConfigError(
                f"GATEWAY_RATE_LIMIT_STORAGE={storage!r} is not valid: expected memory:// (per worker) "
                "or a shared store such as redis://HOST:6379"
            )
        out["rate_limit_storage"] = storage
    proxies = env.get("GATEWAY_TRUSTED_PROXIES", "").strip()
    if proxies:
        networks = []
        for part in proxies.replace(" ", "").split(","):
            if not part:
                continue
            try:
                networks.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ConfigError(
                    f"GATEWAY_TRUSTED_PROXIES={proxies!r} is not valid: {part!r} is not an address or "
                    "network; expected addresses or CIDR networks separated by commas, "
                    "e.g. 127.0.0.1,10.0.0.0/8"
                ) from None
        out["trusted_proxies"] = tuple(networks)
    return out


def _tfserving_tls(env: Mapping[str, str]) -> dict[str, Path | None]:
    """GATEWAY_TFSERVING_TLS_CA, _CERT, _KEY: readable PEM files; CERT and KEY together or neither."""
    paths: dict[str, Path | None] = {}
    for suffix in ("CA", "CERT", "KEY"):
        name = f"GATEWAY_TFSERVING_TLS_{suffix}"
        raw = env.get(name, "").strip()
        path = Path(raw) if raw else None
        if path is not None and not path.is_file():
            raise ConfigError(f"{name}={raw!r} is not valid: expected a readable PEM file; no file is there")
        paths[f"tfserving_tls_{suffix.lower()}"] = path
    if (paths["tfserving_tls_cert"] is None) != (paths["tfserving_tls_key"] is None):
        raise ConfigError(
            "GATEWAY_TFSERVING_TLS_CERT and GATEWAY_TFSERVING_TLS_KEY are not valid: mutual TLS needs "
            "both the client certificate and its key; set both or neither"
        )
    return paths
