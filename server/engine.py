"""The engine loop: schedule, run, post-process, on one thread that owns the model."""
from __future__ import annotations

import logging
import threading
import time

from .errors import Unavailable
from .metrics import ServerMetrics
from .runner import ModelRunner
from .sampler import sample
from .scheduler import Scheduler
from .sequence import Event, FinishReason, Sequence

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, eos_ids: frozenset[int], metrics: ServerMetrics):
        self.runner, self.scheduler, self.eos_ids, self.metrics = runner, scheduler, eos_ids, metrics
        self._wake = threading.Event()
        self._stopping = False
        # Set when the server starts to stop: new requests are refused on every edge (UNAVAILABLE,
        # HTTP 503, /health 503) while running ones finish.
        self.draining = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def submit(self, seq: Sequence) -> None:
        """Queues a request (RESOURCE_EXHAUSTED when the queue is full, UNAVAILABLE while draining);
        events arrive on seq.events."""
        if self.draining:
            raise Unavailable("the server is draining: it finishes running requests and takes no new ones")
        self.scheduler.add(seq)
        self._wake.set()

    def cancel(self, seq: Sequence) -> None:
        seq.cancel()
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping:
            if not self.scheduler.running and not self.scheduler.waiting:
                self._wake.wait()
                self._wake.clear()
                continue
            self.step()

    def step(self) -> None:
        for seq in self.scheduler.take_cancelled():
            self._finish(seq, FinishReason.CANCELLED)
        admitted = self.scheduler.schedule()
        if admitted:
            self._run(admitted, self.runner.prefill)
        decoding = list(self.scheduler.running)
        if decoding:
            self.metrics.decode_batch.observe(len(decoding))
            self._run(decoding, self.runner.decode)
        self.metrics.observe_schedule(self.scheduler)
        if not admitted and not decoding and self.scheduler.waiting:
            # Everyone waiting needs an adapter slot that running requests still hold.
            self._wake.wait(0.005)
            self._wake.clear()

    def _run(self, seqs: list[Sequence], forward) -> None:
        try:
            tokens = sample(forward(seqs), seqs)
        except Exception:  # noqa: BLE001 - a failed pass fails its requests, not the server
            log.exception("forward pass failed for %d requests", len(seqs))
            for seq in seqs:
                self._finish(seq, None, error="the server failed while running this request")
            return
        now = time.monotonic()
        for seq, token in zip(seqs, tokens):
            self._advance(seq, token, now)

    def _advance(self, seq: Sequence, token: int, now: float) -> None:
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.output_ids.append(token)
        if token in self.eos_ids:
            self._finish(seq, FinishReason.END_OF_SEQUENCE)
            return
        piece, stopped = seq.text.push(token)
        if stopped:
            self._finish(seq, FinishReason.STOP, piece=piece)
        elif len(seq.output_ids) >= seq.params.max_tokens:
            self._finish(seq, FinishReason.LENGTH, piece=piece)
        elif piece:
            seq.events.put(Event(piece))

    def _finish(self, seq: Sequence, reason: FinishReason | None, piece: str = "", error: str | None = None) -> None:
        # Cancelled requests were already taken out of the schedule by take_cancelled.
        if seq in self.scheduler.running:
            self.scheduler.finish(seq)
        seq.finish_reason = reason or FinishReason.CANCELLED
        if reason in (FinishReason.END_OF_SEQUENCE, FinishReason.LENGTH):
            piece += seq.text.flush()
        seq.events.put(Event(piece, seq.finish_reason, len(seq.output_ids), error))
        self.metrics.finished(seq)
