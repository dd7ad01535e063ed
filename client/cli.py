"""`python -m client`: predict images and show model status, through the gateway or TF Serving.

Exit codes: 0 success, 1 the server or the request failed (one line on stderr says why), 2 bad
command line (argparse's own convention).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from client.results import ClientError, ModelStatus, PredictResult

DEFAULT_URL = "http://127.0.0.1:8080"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client", description="CIFAR-10 classifier client")
    commands = parser.add_subparsers(dest="command", required=True)

    def add_target(sub: argparse.ArgumentParser) -> None:
        target = sub.add_mutually_exclusive_group()
        target.add_argument("--url", help=f"gateway base URL (default $CIFAR10_URL or {DEFAULT_URL})")
        target.add_argument("--grpc", metavar="HOST:PORT", help="TensorFlow Serving gRPC address instead")
        sub.add_argument("--api-key", help="gateway API key, if it wants one (default $CIFAR10_API_KEY)")
        sub.add_argument("--model", default="cifar10", help="model name on TensorFlow Serving (--grpc)")
        sub.add_argument("--tls", action="store_true", help="use TLS for --grpc")
        sub.add_argument("--ca-file", help="CA certificate (PEM) for --grpc with TLS")
        sub.add_argument("--cert-file", help="client certificate (PEM) for --grpc with mutual TLS")
        sub.add_argument("--key-file", help="client private key (PEM) for --grpc with mutual TLS")
        sub.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default 30)")
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")

    predict = commands.add_parser("predict", help="classify image files")
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    predict.add_argument("--top-k", type=int, default=3, help="labels to show per image (default 3)")
    predict.add_argument("--bytes", action="store_true", help="--grpc: send encoded files (serving_bytes)")
    predict.add_argument("--request-id", help="an id of yours for this call (X-Request-ID, or gRPC "
                         "x-request-id metadata); error messages name it")  # fmt: skip
    add_target(predict)
    status = commands.add_parser("status", help="model name, versions and their states")
    add_target(status)
    return parser


def _client(args: argparse.Namespace):
    if args.grpc:
        from client.grpc import GRPCClient  # imported on demand: it loads TensorFlow's protos

        return GRPCClient(
            args.grpc,
            args.model,
            timeout=args.timeout,
            tls=args.tls,
            ca_file=args.ca_file,
            cert_file=args.cert_file,
            key_file=args.key_file,
        )
    from client.http import HTTPClient

    return HTTPClient(
        args.url or os.environ.get("CIFAR10_URL") or DEFAULT_URL,
        timeout=args.timeout,
        api_key=args.api_key or os.environ.get("CIFAR10_API_KEY") or None,
    )


NOT_SURE = "not sure"  # the model abstained: the labels after it are only its best guesses


def format_predictions(result: PredictResult) -> str:
    width = max([len("IMAGE")] + [len(image.filename) for image in result.images])
    # The SURE column appears only when the model can abstain (exported with the ood outputs).
    trust = any(image.abstain is not None for image in result.images)
    header = f"{'IMAGE':<{width}}  " + (f"{'SURE':<{len(NOT_SURE)}}  " if trust else "") + "PREDICTIONS"
    lines = [f"model {result.model_name} version {result.model_version}", header]
    for image in result.images:
        ranked = "  ".join(f"{label} {p:6.1%}" for label, p in image.top_k)
        sure = f"{NOT_SURE if image.not_sure else 'yes':<{len(NOT_SURE)}}  " if trust else ""
        lines.append(f"{image.filename:<{width}}  {sure}{ranked}")
    return "\n".join(lines)


def format_status(status: ModelStatus) -> str:
    lines = [f"model {status.model_name}: {'ready' if status.ready else 'NOT ready'}", "VERSION  STATE"]
    lines += [f"{v.version:<7}  {v.state}" + (f"  ({v.detail})" if v.detail else "") for v in status.versions]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "predict" and args.bytes and not args.grpc:
        print("error: --bytes needs --grpc (the gateway always takes encoded files)", file=sys.stderr)
        return 2
    try:
        with _client(args) as client:
            if args.command == "predict":
                if args.grpc:
                    result = client.predict(args.images, top_k=args.top_k, use_bytes=args.bytes,
                                            request_id=args.request_id)  # fmt: skip
                else:
                    result = client.predict(args.images, top_k=args.top_k, request_id=args.request_id)
                print(json.dumps(result.to_dict(), indent=2) if args.json else format_predictions(result))
            else:
                status = client.status() if not args.grpc else client.model_status()
                print(json.dumps(status.to_dict(), indent=2) if args.json else format_status(status))
                if not status.ready:
                    return 1
    except ClientError as error:
        print(f"error: {error.message} [{error.code}]", file=sys.stderr)
        return 1
    return 0
