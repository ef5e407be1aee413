"""Errors that carry the user's words, and the one place they become gRPC statuses and HTTP errors."""
from __future__ import annotations

import grpc

from adapters.formats.adapter_dir import AdapterFormatError
from adapters.formats.store_layout import IntegrityError, StoreError, VersionNotFound


class ServingError(Exception):
    code = grpc.StatusCode.INTERNAL
    http_status, http_type = 500, "server_error"     # OpenAI's error "type" for the HTTP edge

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field       # the request field at fault, when one is (OpenAI's "param")

    def __reduce__(self):
        # Crosses processes whole (a Ray replica's refusal reaches the ingress with its field).
        return type(self), (str(self), self.field)


class InvalidArgument(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    http_status, http_type = 400, "invalid_request_error"


class NotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND
    http_status, http_type = 404, "not_found_error"


class AlreadyExists(ServingError):
    code = grpc.StatusCode.ALREADY_EXISTS
    http_status, http_type = 409, "conflict_error"


class ResourceExhausted(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status, http_type = 429, "rate_limit_error"


class RequestTooLarge(ServingError):
    """A request over the documented size limit, refused before it is read whole."""
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status, http_type = 413, "invalid_request_error"


class FailedPrecondition(ServingError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    http_status, http_type = 409, "conflict_error"


class Unauthenticated(ServingError):
    code = grpc.StatusCode.UNAUTHENTICATED
    http_status, http_type = 401, "authentication_error"


class PermissionDenied(ServingError):
    code = grpc.StatusCode.PERMISSION_DENIED
    http_status, http_type = 403, "permission_error"


class DataLoss(ServingError):
    """A stored version whose files no longer match their manifest."""
    code = grpc.StatusCode.DATA_LOSS
    http_status, http_type = 500, "server_error"


class Unavailable(ServingError):
    """The server is draining (or shut down before the request ended), or a part a request needs failed to load."""
    code = grpc.StatusCode.UNAVAILABLE
    http_status, http_type = 503, "service_unavailable_error"


def serving_error(error: Exception) -> Exception:
    """The ServingError that an adapter file's or the store's error stands for; any other error as it is."""
    if isinstance(error, AdapterFormatError):
        return InvalidArgument(str(error))
    if isinstance(error, VersionNotFound):
        return NotFound(str(error))
    if isinstance(error, IntegrityError):
        return DataLoss(str(error))
    if isinstance(error, StoreError):
        return FailedPrecondition(str(error))
    return error


def status_of(error: Exception) -> tuple[grpc.StatusCode, str] | None:
    """The status a handler's exception stands for; None for a bug (left to gRPC as UNKNOWN)."""
    error = serving_error(error)
    if isinstance(error, ServingError):
        return error.code, str(error)
    return None


def http_error_of(error: Exception) -> tuple[int, dict]:
    """HTTP status and OpenAI's error body for a handler's exception; a bug is a 500 that says little."""
    error = serving_error(error)
    if not isinstance(error, ServingError):
        error = ServingError("the server failed while handling this request")
    return error.http_status, {"error": {"message": str(error), "type": error.http_type, "param": error.field,
                                         "code": None}}


class StatusInterceptor(grpc.ServerInterceptor):
    """Turns ServingError (and adapter format errors) raised in any handler into its status, and
    bytes that do not parse as the method's request into INVALID_ARGUMENT (gRPC itself says INTERNAL)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        parse = _lenient(handler.request_deserializer, handler_call_details.method)
        if handler.unary_unary:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary), request_deserializer=parse)
        if handler.unary_stream:
            return handler._replace(unary_stream=_wrap_stream(handler.unary_stream), request_deserializer=parse)
        return handler


class _Malformed:
    """Stands in for a request whose bytes did not parse, so the handler can answer with a status."""

    def __init__(self, method: str, error: Exception):
        self.message = f"the request is not a valid message for {method}: {error}"


def _lenient(deserialize, method: str):
    if deserialize is None:
        return None

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as error:  # noqa: BLE001 - protobuf raises DecodeError, and more for odd bytes
            return _Malformed(method, error)
    return parse


def abort(context: grpc.ServicerContext, error: Exception) -> None:
    """Ends the call with the error's status; an error that stands for no status is re-raised."""
    status = status_of(error)
    if status is None:
        raise error
    context.abort(*status)


def _wrap_unary(behaviour):
    def handle(request, context):
        if isinstance(request, _Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            return behaviour(request, context)
        except Exception as error:  # noqa: BLE001 - re-raised unless it maps to a status
            abort(context, error)
    return handle


def _wrap_stream(behaviour):
    def handle(request, context):
        if isinstance(request, _Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            yield from behaviour(request, context)
        except Exception as error:  # noqa: BLE001 - re-raised unless it maps to a status
            abort(context, error)
    return handle
