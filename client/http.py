"""Client for the gateway's HTTP API (serving/api.py): POST /v1/predict, GET /v1/models, GET /readyz.

One requests.Session per client keeps connections alive between calls. urllib3's Retry handles
connection failures and 503 answers with exponential backoff, honouring the gateway's Retry-After.
POST is retried too: a prediction has no side effects, so sending it twice is safe.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Sequence
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from client.images import ImageInput, read_image
from client.results import ClientError, ImagePrediction, ModelStatus, PredictResult, VersionStatus
from contract.signatures import DEFAULT_TOP_K


class HTTPClient:
    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        backoff_factor: float = 0.2,
        max_retry_after_s: int = 10,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ClientError(
                "invalid_url", f"{base_url!r} is not an http(s) URL; e.g. http://localhost:8080"
            )
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        retry = Retry(
            total=retries,
            connect=retries,
            read=0,  # a request that timed out mid-answer is reported, not silently repeated
            status=retries,
            status_forcelist=(503,),
            allowed_methods=frozenset({"GET", "POST"}),
            backoff_factor=backoff_factor,
            respect_retry_after_header=True,
            # A Retry-After of minutes would stall the caller; beyond this cap, wait the cap.
            retry_after_max=int(max_retry_after_s),
            raise_on_status=False,  # the last 503 comes back as a response, so its JSON error is read
        )
        self._session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def __enter__(self) -> HTTPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = f"{self.base_url}{path}"
        try:
            response = self._session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.exceptions.RetryError as error:  # only when raise_on_status would be True
            raise ClientError("retries_exhausted", f"{url}: {error}") from None
        except requests.exceptions.ConnectionError as error:
            if isinstance(error, requests.exceptions.ConnectTimeout):
                raise ClientError(
                    "timeout", f"could not connect to {url} within {self.timeout} s; is the gateway running?"
                ) from None
            raise ClientError(
                "connection_error",
                f"could not connect to {url} (retried); is the gateway running at that URL?",
            ) from None
        except requests.exceptions.Timeout:
            raise ClientError(
                "timeout",
                f"{url} did not answer within {self.timeout} s; raise the timeout or send fewer images",
            ) from None
        if response.status_code >= 400:
            raise _error_from(response)
        return response

    def predict(self, images: Sequence[ImageInput], *, top_k: int = DEFAULT_TOP_K) -> PredictResult:
        """Classify images (paths or (filename, bytes) pairs) in one request."""
        if not images:
            raise ClientError("no_images", "pass at least one image")
        files = []
        for image in images:
            filename, data = read_image(image)
            content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
            files.append(("images", (filename, data, content_type)))
        body = self._request("POST", "/v1/predict", files=files, data={"top_k": str(top_k)}).json()
        try:
            return PredictResult(
                model_name=body["model"]["name"],
                model_version=int(body["model"]["version"]),
                images=[
                    ImagePrediction(
                        filename=item["filename"],
                        top_k=[(entry["label"], float(entry["probability"])) for entry in item["top_k"]],
                        probabilities={k: float(v) for k, v in item["probabilities"].items()},
                    )
                    for item in body["predictions"]
                ],
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ClientError(
                "bad_response", f"the gateway's answer lacks {error}; is {self.base_url} the gateway?"
            ) from None

    def models(self) -> dict[str, Any]:
        """GET /v1/models: name, version, class_names, input_size, backend, model_card."""
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


def _error_from(response: requests.Response) -> ClientError:
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code = f"http_{response.status_code}"
        message = (
            f"{response.request.method} {response.url} answered {response.status_code} {response.reason}"
        )
    return ClientError(code, message, status=response.status_code)
