"""Who may call, and when: bearer tokens for admin and inference calls, and no new calls while draining.

Every `cartridge.v1` call passes here before its handler runs, and every OpenAI HTTP completion
(server/edge/http_app.py) through `admit`/`leave` and `check_token`. Health and reflection stay open,
so a load balancer can still read NOT_SERVING while the server drains.
"""
from __future__ import annotations

import hmac
import threading
from pathlib import Path

import grpc

from ..errors import PermissionDenied, ServingError, Unauthenticated, Unavailable, abort

GUARDED = "/cartridge.v1."
# Calls that make the server read files or change what it serves.
ADMIN_METHODS = frozenset({"/cartridge.v1.Adapters/RegisterAdapter", "/cartridge.v1.Adapters/UnregisterAdapter"})
DRAINING = "the server is draining (shutting down) and takes no new calls; retry on another instance"


def read_token(path: str, flag: str) -> str:
    """The token in `path` (surrounding whitespace dropped); ValueError when it is empty or unreadable."""
    try:
        token = Path(path).read_text().strip()
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot be read ({err.strerror})") from None
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"{flag} {path}: must hold one token without spaces")
    return token


class CallGate(grpc.ServerInterceptor):
    def __init__(self, admin_token: str | None, inference_token: str | None):
        self._admin = admin_token.encode() if admin_token else None
        self._inference = inference_token.encode() if inference_token else None
        self._lock = threading.Condition()
        self._in_flight = 0
        self._draining = False

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def begin_drain(self) -> None:
        """From now on new calls get UNAVAILABLE; those already admitted run on."""
        with self._lock:
            self._draining = True

    def admit(self) -> None:
        """Counts a call in, or refuses it (Unavailable) while draining; `leave` when it ends."""
        with self._lock:
            if self._draining:
                raise Unavailable(DRAINING)
            self._in_flight += 1

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
            self._lock.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """True once no admitted call is running, False if `timeout` seconds pass first."""
        with self._lock:
            return self._lock.wait_for(lambda: self._in_flight == 0, timeout)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(GUARDED):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        refusal = self.check_token(handler_call_details.method, metadata.get("authorization"))

        def admit(context: grpc.ServicerContext) -> None:
            if refusal is not None:
                abort(context, refusal)
            try:
                self.admit()
            except Unavailable as error:
                abort(context, error)
            if not context.add_callback(self.leave):   # fires however the call ends
                self.leave()

        if handler.unary_unary:
            behaviour = handler.unary_unary

            def unary(request, context):
                admit(context)
                return behaviour(request, context)
            return handler._replace(unary_unary=unary)
        behaviour = handler.unary_stream

        def stream(request, context):
            admit(context)
            yield from behaviour(request, context)
        return handler._replace(unary_stream=stream)

    def check_token(self, method: str, authorization: str | None) -> ServingError | None:
        """The refusal for a call to `method` with this authorization header, None when it may go on."""
        admin = method in ADMIN_METHODS
        # The admin token opens inference calls too; an open kind of call needs no token at all.
        accepted = [self._admin] if admin else [self._inference, self._admin] if self._inference else []
        accepted = [token for token in accepted if token is not None]
        if not accepted:
            return None
        kind = "admin" if admin else "inference"
        if authorization is None:
            return Unauthenticated(f"{method} needs the {kind} token: send metadata "
                                   f"'authorization: Bearer <token>'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return Unauthenticated("the authorization metadata must read 'Bearer <token>'")
        presented = token.strip().encode()
        # Compare with every accepted token, in constant time, so timing tells nothing about either.
        matches = [hmac.compare_digest(presented, expected) for expected in accepted]
        if not any(matches):
            return PermissionDenied(f"the token does not grant {kind} calls such as {method}")
        return None
