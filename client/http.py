"""Client for the gateway's HTTP API (serving/api.py): POST /v1/predict, GET /v1/models, GET /readyz.

One requests.Session per client keeps connections alive between calls. Failures that a retry can
fix (no connection, 503) are retried, POST too (a prediction has no side effects), but sparingly,
so that many clients cannot turn a struggling gateway into a dead one (issue 13, item 5):
  * at most `retries` retries per call (default 1), each after the gateway's Retry-After (a 503
    asking for longer than `max_retry_after_s` is reported at once, not retried early) or, without
    one, an exponential backoff;
  * a retry budget per client (contract/overload.py): retries add at most 20 % to the calls made
    over the last 10 s, plus a reserve of 3;
  * a circuit breaker per client: after `breaker_failures` calls in a row fail (503, no connection,
    timeout), calls fail at once with `circuit_open` for `breaker_open_s`, then one probe goes out.
"""

from __future__ import annotations

import mimetypes
import time
from collections.abc import Sequence
from typing import Any

import requests

from client.images import ImageInput, read_image
from client.results import (
    ClientError,
    ImagePrediction,
    ModelStatus,
    PredictResult,
    VersionStatus,
    check_request_id,
)
from contract.overload import CircuitBreaker, CircuitOpen, RetryBudget
from contract.request_id import HEADER as REQUEST_ID_HEADER
from contract.signatures import DEFAULT_TOP_K


class HTTPClient:
    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        retries: int = 1,
        backoff_factor: float = 0.2,
        max_retry_after_s: float = 10,
        retry_budget: RetryBudget | None = None,
        breaker_failures: int = 5,
        breaker_open_s: float = 5.0,
        api_key: str | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ClientError(
                "invalid_url", f"{base_url!r} is not an http(s) URL; e.g. http://localhost:8080"
            )
        if retries < 0:
            raise ClientError("invalid_retries", f"retries must be >= 0, got {retries}")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff_factor = backoff_factor
        self.max_retry_after_s = max_retry_after_s
        self.retry_budget = retry_budget or RetryBudget(0.2, window_s=10.0, min_retries=3)
        self.breaker = CircuitBreaker(breaker_failures, breaker_open_s)
        self.attempts = 0  # HTTP requests sent, retries included (for callers' metrics and tests)
        self._session = requests.Session()
        if api_key:  # the gateway's API key (serving/auth.py), sent with every request
            self._session.headers["Authorization"] = f"Bearer {api_key}"

    def __enter__(self) -> HTTPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = f"{self.base_url}{path}"
        try:
            self.breaker.before_call()
        except CircuitOpen as error:
            raise ClientError(
                "circuit_open",
                f"{url}: the last {self.breaker.failures} calls to the gateway failed; not calling it "
                f"for another {error.retry_after_s:.1f} s so it can recover",
            ) from None
        self.retry_budget.record_call()
        healthy: bool | None = None  # what this call says about the gateway, for the breaker
        try:
            for attempt in range(self.retries + 1):
                last = attempt == self.retries
                self.attempts += 1
                try:
                    response = self._session.request(method, url, timeout=self.timeout, **kwargs)
                except requests.exceptions.ConnectionError as error:
                    # Covers ConnectTimeout too: the request never reached the gateway.
                    if not last and self._may_retry():
                        time.sleep(self.backoff_factor * 2**attempt)
                        continue
                    healthy = False
                    raise _connection_error(url, error, self.timeout, attempt + 1) from None
                except requests.exceptions.Timeout:
                    # Timed out mid-answer: reported, not silently repeated (the gateway is still busy).
                    healthy = False
                    raise ClientError(
                        "timeout",
                        f"{url} did not answer within {self.timeout} s; "
                        "raise the timeout or send fewer images",
                    ) from None
                if response.status_code == 503:
                    wait = self._retry_wait(response, attempt)
                    if not last and wait is not None and self._may_retry():
                        time.sleep(wait)
                        continue
                    healthy = False
                    raise _error_from(response)
                healthy = True if response.status_code < 500 else None
                if response.status_code >= 400:
                    raise _error_from(response)
                return response
            raise AssertionError("unreachable")
        finally:
            self.breaker.record(healthy)

    def _may_retry(self) -> bool:
        return self.retry_budget.try_retry()

    def _retry_wait(self, response: requests.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying this 503: its Retry-After, or the backoff; None: do not
        retry (the gateway asked for a longer pause than this client will wait)."""
        raw = response.headers.get("Retry-After", "").strip()
        if not raw.isdigit():  # absent (or an HTTP date, which the gateway never sends)
            return self.backoff_factor * 2**attempt
        seconds = float(raw)
        return seconds if seconds <= self.max_retry_after_s else None

    def predict(
        self, images: Sequence[ImageInput], *, top_k: int = DEFAULT_TOP_K, request_id: str | None = None
    ) -> PredictResult:
        """Classify images (paths or (filename, bytes) pairs) in one request. `request_id` (1..64 of
        A-Z a-z 0-9 . _ -) is sent as X-Request-ID, which the gateway keeps for its logs and error
        bodies (and TF Serving's metadata); without one the gateway makes its own."""
        if not images:
            raise ClientError("no_images", "pass at least one image")
        if request_id:
            check_request_id(request_id)
        files = []
        for image in images:
            filename, data = read_image(image)
            content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
            files.append(("images", (filename, data, content_type)))
        headers = {REQUEST_ID_HEADER: request_id} if request_id else None
        body = self._request(
            "POST", "/v1/predict", files=files, data={"top_k": str(top_k)}, headers=headers
        ).json()
        try:
            return PredictResult(
                model_name=body["model"]["name"],
                model_version=int(body["model"]["version"]),
                images=[
                    ImagePrediction(
                        filename=item["filename"],
                        top_k=[(entry["label"], float(entry["probability"])) for entry in item["top_k"]],
                        probabilities={k: float(v) for k, v in item["probabilities"].items()},
                        # null, or absent from a gateway older than issue 17: None ("cannot say")
                        ood_score=_optional(item.get("ood_score"), float),
                        abstain=_optional(item.get("abstain"), bool),
                    )
                    for item in body["predictions"]
                ],
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ClientError(
                "bad_response", f"the gateway's answer lacks {error}; is {self.base_url} the gateway?"
            ) from None

    def models(self) -> dict[str, Any]:
        """GET /v1/models: name, version, class_names, input_size, backend, rollout, model_card."""
        return self._request("GET", "/v1/models").json()

    def ready(self) -> bool:
        """True when /readyz answers 200; False on 503 (after retries)."""
        try:
            self._request("GET", "/readyz")
        except ClientError as error:
            if error.status == 503:
                return False
            raise
        return True

    def status(self) -> ModelStatus:
        """The version the gateway serves (AVAILABLE, with its backend and what it was trained on)
        and any newer version that failed to load (END, with the error), as /readyz lists them."""
        info = self.models()
        detail = f"backend {info.get('backend', '?')}"
        card = info.get("model_card") or {}
        if card.get("dataset"):
            synthetic = " (SYNTHETIC demo data)" if card.get("synthetic") else ""
            detail += f", trained on {card['dataset']}{synthetic}"
        failed = self._request("GET", "/readyz").json().get("failed_versions") or {}
        versions = [VersionStatus(int(v), "END", f"failed to load: {error}") for v, error in failed.items()]
        versions.append(VersionStatus(int(info["version"]), "AVAILABLE", detail))
        return ModelStatus(model_name=info["name"], versions=sorted(versions, key=lambda v: -v.version))


def _optional(value: Any, kind: type) -> Any:
    """`value` as `kind` (float or bool), None kept; a value of another JSON type is a bad answer."""
    if value is None:
        return None
    if kind is bool and not isinstance(value, bool):
        raise TypeError(f"abstain={value!r} (not a boolean)")
    if kind is float and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise TypeError(f"ood_score={value!r} (not a number)")
    return kind(value)


def _connection_error(
    url: str, error: requests.exceptions.ConnectionError, timeout: float, attempts: int
) -> ClientError:
    if isinstance(error, requests.exceptions.ConnectTimeout):
        return ClientError(
            "timeout", f"could not connect to {url} within {timeout} s; is the gateway running?"
        )
    tries = f" ({attempts} attempts)" if attempts > 1 else ""
    return ClientError(
        "connection_error", f"could not connect to {url}{tries}; is the gateway running at that URL?"
    )


def _error_from(response: requests.Response) -> ClientError:
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
        if error.get("request_id"):  # what the gateway's operators look the failure up by
            message += f" (request_id {error['request_id']})"
    except (ValueError, KeyError, TypeError, AttributeError):
        code = f"http_{response.status_code}"
        message = (
            f"{response.request.method} {response.url} answered {response.status_code} {response.reason}"
        )
    return ClientError(code, message, status=response.status_code)
