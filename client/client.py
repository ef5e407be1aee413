"""A thin Python client for a Cartridge server. Needs grpc and the generated protos, not torch."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import grpc

from cartridge.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc

# The answer's types, importable from here with the client that returns them.
from .completion import Choice, Completion, TokenLogprob, ToolCall, TopLogprob  # noqa: F401
from .request import generate_request

ADMIN_TOKEN_ENV = "CARTRIDGE_ADMIN_TOKEN"
INFERENCE_TOKEN_ENV = "CARTRIDGE_INFERENCE_TOKEN"
TLS_CA_ENV = "CARTRIDGE_TLS_CA"
LOCATIONS = {
    adapters_pb2.ADAPTER_LOCATION_UNSPECIFIED: None,
    adapters_pb2.ADAPTER_LOCATION_DEVICE: "device",
    adapters_pb2.ADAPTER_LOCATION_HOST: "host",
    adapters_pb2.ADAPTER_LOCATION_DISK: "disk",
}

class CartridgeError(Exception):
    """A call the server refused or failed: `code` is the gRPC status, the message says why."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message


class ServerUnreachable(CartridgeError):
    """No server answered at the address (code UNAVAILABLE); the message names the address and what to do."""

    def __str__(self) -> str:
        return self.message


_LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")


def _call_error(err: grpc.RpcError, target: str) -> CartridgeError:
    """The call's error, with gRPC's words for "nothing listens there" put as what the user can do about it."""
    code, details = err.code(), err.details() or ""
    if code != grpc.StatusCode.UNAVAILABLE:
        return CartridgeError(code, details)
    host, colon, port = target.rpartition(":")
    if "Connection refused" in details and colon:
        where = "" if host in _LOCAL_HOSTS else f" on {host}"
        flags = f"--port {port}" if host in _LOCAL_HOSTS else f"--host {host} --port {port}"
        return ServerUnreachable(code, f"no server at {target}: start one{where} with `cartridge serve {flags}`")
    if details.startswith("errors resolving") or "DNS resolution failed" in details:
        return ServerUnreachable(code, f"no server at {target}: the host name {host!r} does not resolve")
    return CartridgeError(code, details)


class CartridgeClient:
    """`admin_token` (Register/Unregister) and `inference_token` default to $CARTRIDGE_ADMIN_TOKEN and
    $CARTRIDGE_INFERENCE_TOKEN; `tls_ca` (a PEM file that signed the server's certificate, default
    $CARTRIDGE_TLS_CA) turns on TLS."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float | None = None, *,
                 admin_token: str | None = None, inference_token: str | None = None, tls_ca: str | None = None):
        admin_token = admin_token or os.environ.get(ADMIN_TOKEN_ENV)
        inference_token = inference_token or os.environ.get(INFERENCE_TOKEN_ENV) or admin_token
        self._admin_metadata = _bearer(admin_token)
        self._inference_metadata = _bearer(inference_token)
        self.target = target
        tls_ca = tls_ca or os.environ.get(TLS_CA_ENV)
        if tls_ca:
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self._channel = grpc.secure_channel(target, credentials)
        else:
            self._channel = grpc.insecure_channel(target)
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)
        self._adapters = adapters_pb2_grpc.AdaptersStub(self._channel)
        self.timeout = timeout

    def __enter__(self) -> "CartridgeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(self, prompt: str = "", **options) -> Completion:
        """One whole answer (every choice of it in `choices`). `options`, as OpenAI's API names and shapes
        them: messages, adapter, max_tokens, temperature, top_p, top_k, seed, stop, response_format
        ({"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}, {"type": "json_object"},
        {"type": "regex", "regex": ...}, {"type": "choice", "choice": [...]}), logprobs, top_logprobs,
        prompt_logprobs, presence_penalty, frequency_penalty, repetition_penalty, logit_bias ({token_id:
        bias}), n, tools ([{"type": "function", "function": {...}}]), tool_choice, routing_key (keeps the
        caller on one side of a canary split). ValueError for a value the request cannot carry."""
        return Completion.from_proto(self._call(self._inference.Generate, generate_request(prompt, **options),
                                                self._inference_metadata))

    def generate_stream(self, prompt: str = "", **options) -> Iterator[Completion]:
        """Pieces of the answer as they are generated, each naming its `choice_index`; a choice's last piece
        carries its finish_reason, counts and tool calls. Closing the iterator early cancels the request."""
        call = self._inference.GenerateStream(generate_request(prompt, **options), timeout=self.timeout,
                                              metadata=self._inference_metadata)
        try:
            for message in call:
                yield Completion.from_proto(message, streamed=True)
        except grpc.RpcError as err:
            raise _call_error(err, self.target) from None
        finally:
            call.cancel()  # a caller that stops reading early frees its slot on the server at once

    def feedback(self, request_id: str, score: float, tag: str = "") -> str:
        """Rates an answer from -1 (bad) to 1 (good), for the stored version that gave it; returns that
        version as name@vN. `tag`: an optional label (1 to 32 of [A-Za-z0-9._-])."""
        request = inference_pb2.FeedbackRequest(request_id=request_id, score=score, tag=tag)
        return self._call(self._inference.Feedback, request, self._inference_metadata).adapter_version

    def register_adapter(self, name: str, path: str, replace: bool = False,
                         pin: bool = False) -> adapters_pb2.AdapterInfo:
        request = adapters_pb2.RegisterAdapterRequest(name=name, path=path, replace=replace, pin=pin)
        return self._call(self._adapters.RegisterAdapter, request, self._admin_metadata)

    def unregister_adapter(self, name: str) -> None:
        self._call(self._adapters.UnregisterAdapter, adapters_pb2.UnregisterAdapterRequest(name=name),
                   self._admin_metadata)

    def list_adapters(self) -> list[adapters_pb2.AdapterInfo]:
        """Each adapter's settings, `location` (ADAPTER_LOCATION_*, see LOCATIONS), `pinned` and `problem`."""
        return list(self._call(self._adapters.ListAdapters, adapters_pb2.ListAdaptersRequest(),
                               self._inference_metadata).adapters)

    def _call(self, method, request, metadata):
        try:
            return method(request, timeout=self.timeout, metadata=metadata)
        except grpc.RpcError as err:
            raise _call_error(err, self.target) from None


def _bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token.strip()}"),) if token else ()
