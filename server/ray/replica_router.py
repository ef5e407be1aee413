"""Calls for one engine replica in particular: a rating goes to the replica that gave the answer, and the
Ingress reads the metrics page of every replica.

Ray Serve sends a call to whichever replica its router picks. `ReplicaRouter`, the engine deployment's
request router, picks as Ray's default one does (two random replicas, those holding the request's adapter
first; the less busy of the two) for every call but one with a `replica=` keyword argument, which goes to
that replica, waiting while it is busy. It runs in the process holding the handle (the Ingress) and
records there the replicas it routes to (replica_ids.py), so the Ingress knows whose metrics to read.
"""
from __future__ import annotations

import random

from ray.serve.request_router import (FIFOMixin, LocalityMixin, MultiplexMixin, PendingRequest, RequestRouter,
                                      RunningReplica)

from . import replica_ids


class ReplicaRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    # The mixins of Ray's default router. Its FIFOMixin may hand the replica chosen for one call to an older
    # waiting call, even one meant for another replica: that replica refuses it (WrongReplica) and the Ingress
    # sends it again. Without FIFOMixin, Ray (2.60) stopped routing streamed calls to multiplexed replicas.

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        target = pending_request.kwargs.get(replica_ids.REPLICA_ARG) if pending_request is not None else None
        if target is not None:
            pending_request.routing_context.should_backoff = True   # busy: wait, without spinning
            return [[r for r in candidate_replicas if r.replica_id.unique_id == target]]
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            ids = self.apply_multiplex_routing(pending_request=pending_request)
        else:
            ids = self.apply_locality_routing(pending_request=pending_request)
        return [[self.curr_replicas[i] for i in random.sample(list(ids), min(2, len(ids)))]]

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        replica_ids.record_running(self.app_name, frozenset(r.replica_id.unique_id for r in replicas))
