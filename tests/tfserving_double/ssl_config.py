"""TF Serving's --ssl_config_file, read as the real server reads it: a text-format `SSLConfig`
(tensorflow_serving/config/ssl_config.proto) whose fields hold PEM contents.

tensorflow-serving-api does not ship ssl_config_pb2, so the message is built here from the .proto's
four fields (same names, numbers and types); text_format then refuses what the server's parser
refuses (an unknown field, a bad value). `tls_options` turns it into the double's TLS arguments the
way model_servers/server.cc builds its credentials: the key and certificate always; with
client_verify, custom_ca as the CA client certificates must chain to (mutual TLS).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

_FIELDS = (  # name, number, type, as in ssl_config.proto
    ("server_key", 1, descriptor_pb2.FieldDescriptorProto.TYPE_STRING),
    ("server_cert", 2, descriptor_pb2.FieldDescriptorProto.TYPE_STRING),
    ("custom_ca", 3, descriptor_pb2.FieldDescriptorProto.TYPE_STRING),
    ("client_verify", 4, descriptor_pb2.FieldDescriptorProto.TYPE_BOOL),
)


@functools.cache
def ssl_config_class() -> type:
    """The `tensorflow.serving.SSLConfig` message class (in a pool of its own)."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="tests/tfserving_double/ssl_config.proto", package="tensorflow.serving", syntax="proto3"
    )
    message = proto.message_type.add(name="SSLConfig")
    for name, number, kind in _FIELDS:
        message.field.add(
            name=name, number=number, type=kind, label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
        )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.SSLConfig"))


def read_ssl_config(path: Path) -> Any:
    """The parsed SSLConfig in `path`; google.protobuf.text_format.ParseError when it does not parse."""
    return text_format.Parse(path.read_text(), ssl_config_class()())


def tls_options(path: Path) -> dict[str, Any]:
    """TFServingDouble's keyword arguments for the server `path` configures."""
    config = read_ssl_config(path)
    return {
        "tls_key_and_cert": (config.server_key.encode(), config.server_cert.encode()),
        "tls_client_ca": config.custom_ca.encode() if config.client_verify else None,
    }
