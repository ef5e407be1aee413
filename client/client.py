"""A thin Python client for a Cartridge server. Needs grpc and the generated protos, not torch."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import grpc

from cartridge.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc

UINT32_MAX, UINT64_MAX = 2**32 - 1, 2**64 - 1
ADMIN_TOKEN_ENV = "CARTRIDGE_ADMIN_TOKEN"
INFERENCE_TOKEN_ENV = "CARTRIDGE_INFERENCE_TOKEN"
TLS_CA_ENV = "CARTRIDGE_TLS_CA"
LOCATIONS = {
    adapters_pb2.ADAPTER_LOCATION_UNSPECIFIED: None,
    adapters_pb2.ADAPTER_LOCATION_DEVICE: "device",
    adapters_pb2.ADAPTER_LOCATION_HOST: "host",
    adapters_pb2.ADAPTER_LOCATION_DISK: "disk",
}

FINISH_REASONS = {
    inference_pb2.FINISH_REASON_UNSPECIFIED: None,
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_END_OF_SEQUENCE: "end_of_sequence",
    inference_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
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


@dataclass(frozen=True, slots=True)
class Completion:
    """Generate's answer, or one GenerateStream piece (finish_reason None until the last)."""
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    adapter: str
    adapter_version: str = ""    # name@vN: the stored version that answered (serve --store)
    request_id: str = ""         # what `feedback` rates (on the last piece of a stream)

    @classmethod
    def from_proto(cls, message: inference_pb2.GenerateResponse) -> "Completion":
        return cls(message.text, FINISH_REASONS[message.finish_reason], message.prompt_tokens,
                   message.completion_tokens, message.adapter, message.adapter_version, message.request_id)


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
        """One whole answer. `options`: messages, adapter, max_tokens, temperature, top_p, top_k, seed, stop,
        routing_key (keeps the caller on one side of a canary split)."""
        return Completion.from_proto(self._call(self._inference.Generate, _request(prompt, **options),
                                                self._inference_metadata))

    def generate_stream(self, prompt: str = "", **options) -> Iterator[Completion]:
        """Pieces of the answer as they are generated; the last carries finish_reason and counts.
        Closing the iterator early cancels the request."""
        call = self._inference.GenerateStream(_request(prompt, **options), timeout=self.timeout,
                                              metadata=self._inference_metadata)
        try:
            for message in call:
                yield Completion.from_proto(message)
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


def _request(prompt: str = "", *, messages: Sequence[dict[str, str]] = (), adapter: str = "", max_tokens: int = 0,
             temperature: float | None = None, top_p: float = 0.0, top_k: int = 0, seed: int | None = None,
             stop: Sequence[str] = (), routing_key: str = "") -> inference_pb2.GenerateRequest:
    for field, value, largest in (("max_tokens", max_tokens, UINT32_MAX), ("top_k", top_k, UINT32_MAX),
                                  ("seed", 0 if seed is None else seed, UINT64_MAX)):
        if not isinstance(value, int) or not 0 <= value <= largest:
            raise ValueError(f"{field} must be a whole number from 0 to {largest}, got {value!r}")
    return inference_pb2.GenerateRequest(
        prompt=prompt, messages=[inference_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
        adapter=adapter, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        stop=list(stop), routing_key=routing_key)


def _bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token.strip()}"),) if token else ()
