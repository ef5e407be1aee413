"""Which engine replica: the replicas the Ingress can reach, and answer ids that name the replica that answered.

An answer's id names the replica that gave it, so a rating of the answer can go there (only that replica
remembers which version answered), and the Ingress keeps no record of answers: any number of Ingress
replicas, or a restarted one, can route a rating.

The set of running replicas is kept here, not in replica_router.py: Ray copies a request router's own module
into the process that routes (it pickles the class by value), so only a module it imports is shared with
the Ingress.
"""
from __future__ import annotations

from ..errors import NotFound

REPLICA_ARG = "replica"          # the keyword argument naming the replica a call must reach
_SEPARATOR = "."                 # between a request's id and its replica's in an answer id; in neither of them
_running: dict[str, frozenset[str]] = {}   # app name -> its engine replicas' ids, as this process's router knows them


class WrongReplica(Exception):
    """A call meant for another replica (Ray's router may hand a call the replica chosen for another one)."""

    def __init__(self, meant_for: str):
        super().__init__(f"meant for replica {meant_for}")
        self.meant_for = meant_for

    def __reduce__(self):
        return type(self), (self.meant_for,)


def check_replica(meant_for: str, this: str) -> None:
    if meant_for != this:
        raise WrongReplica(meant_for)


def record_running(app: str, replicas: frozenset[str]) -> None:
    _running[app] = replicas


def running_replicas(app: str) -> frozenset[str]:
    """The engine replicas of `app` that this process routes to (empty until its router's first update)."""
    return _running.get(app, frozenset())


def answer_id(request_id: str, replica: str) -> str:
    return f"{request_id}{_SEPARATOR}{replica}"


def split_answer_id(text: str) -> tuple[str, str]:
    """(the request's id on its replica, the replica) of an id an answer carried through this application."""
    request_id, _, replica = text.rpartition(_SEPARATOR)
    if not request_id or not replica:
        raise NotFound(f"request {text[:128]!r} was not answered through this Ray application: its answers' ids "
                       f"end in {_SEPARATOR}REPLICA, the replica that gave them", field="request_id")
    return request_id, replica
