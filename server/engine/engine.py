"""The engine loop: schedule, run, post-process, on one thread that owns the model."""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future

from ..lora.registry import AdapterRegistry, RegisteredAdapter
from ..errors import ResourceExhausted, ServingError
from .adapter_jobs import AdapterJobs
from .metrics import ServerMetrics
from .runner import DecodePass, ModelRunner
from .scheduler import Scheduler
from .sequence import Event, FinishReason, Sequence, TokenLogprob, Work

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, eos_ids: frozenset[int], metrics: ServerMetrics,
                 registry: AdapterRegistry):
        self.runner, self.scheduler, self.eos_ids, self.metrics = runner, scheduler, eos_ids, metrics
        self.registry = registry
        self._wake = threading.Event()
        self._stopping = False
        self._abort: ServingError | None = None
        self._ready_at: float | None = None     # when the last pass's tokens reached the host, while busy
        self._in_flight: DecodePass | None = None
        self.adapter_jobs = AdapterJobs(registry, scheduler.adapter_slots, self._wake.set)
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def submit(self, seq: Sequence) -> None:
        """Queues a request and its forks (n > 1; RESOURCE_EXHAUSTED when the queue is full); events arrive on
        seq.events. Every edge submits here, so every choice holds its adapter version until it ends."""
        choices = (seq, *seq.forks)
        if seq.adapter is not None:
            held = 0
            try:
                for _ in choices:
                    self.registry.hold(seq.adapter)      # dropped by the engine as each choice ends
                    held += 1
            except ServingError:
                for _ in range(held):
                    self.registry.drop_hold(seq.adapter)
                self.metrics.refused(seq)
                raise
        try:
            self.scheduler.add(seq)
        except ServingError:
            if seq.adapter is not None:
                for _ in choices:
                    self.registry.drop_hold(seq.adapter)
            raise
        self._wake.set()
        if seq.pair is not None and not seq.shadow:
            self._submit_shadow(seq.pair.shadow)

    def _submit_shadow(self, copy: Sequence) -> None:
        """A live row's shadow copy goes in only while no live row waits for room; what goes wrong with it
        is the shadow version's (counted), never the caller's."""
        if self.scheduler.needs_room():
            self.metrics.shadows.count_shed(copy)
            return
        try:
            self.submit(copy)
        except ResourceExhausted:
            self.metrics.shadows.count_shed(copy)
        except ServingError:
            pass    # its version could not be held: counted as that version's error by submit

    def cancel(self, seq: Sequence) -> None:
        """Cancels `seq` and its forks (the request's other choices)."""
        for member in (seq, *seq.forks):
            member.cancel()
        self._wake.set()

    def abort_all(self, error: ServingError) -> None:
        """Ends every queued and running request, now and from now on, with `error` (drain timeout)."""
        self._abort = error
        self._wake.set()

    def pin(self, adapter: RegisteredAdapter) -> Future:
        """Resolves once `adapter` holds a device slot for good (AdapterJobs.pin)."""
        return self.adapter_jobs.pin(adapter)

    def warm(self, adapter: RegisteredAdapter) -> Future:
        """Resolves True once `adapter` sits in an idle device slot (AdapterJobs.warm)."""
        return self.adapter_jobs.warm(adapter)

    def discard(self, adapter: RegisteredAdapter) -> None:
        """A replaced or unregistered version gives up its pin and, once idle, its slot, and its metric
        series once nothing uses them."""
        self.adapter_jobs.discard(adapter)
        self._forget_if_unused(adapter)

    def _loop(self) -> None:
        while not self._stopping:
            retry = self.adapter_jobs.run()
            if not self.scheduler.running and not self.scheduler.waiting:
                self._settle()           # a pass launched for requests that have all ended since
                self._ready_at = None
                self._wake.wait(0.005 if retry else None)
                self._wake.clear()
                continue
            self.step()

    def step(self) -> None:
        """Schedule, run, post-process. With CUDA graphs a decode pass of the same requests as the one
        in flight is launched from that pass's tokens before the host reads them, so detokenizing,
        streaming and the other threads run while the device works; a pass is then computed for a
        request that has just finished, and its token is dropped."""
        if self._abort is not None:
            self._in_flight = None
            for seq in self.scheduler.take_all():
                self._finish(seq, None, error=self._abort)
        for seq in self.scheduler.shadows_to_shed():
            seq.cancel()
            self.metrics.shadows.count_shed(seq)
        for seq in self.scheduler.take_cancelled():
            self._finish(seq, FinishReason.CANCELLED)
        previous = self._in_flight
        # A row with a grammar needs its last token accepted before its next mask: no chaining then.
        work = None
        if previous is not None and self.runner.can_chain and not any(s.grammar is not None for s in previous.seqs):
            work = self.scheduler.chain(previous.seqs)
        if work is None:
            previous = None
            self._settle()
            plan = self.scheduler.schedule()
            work = plan.work
            self.metrics.observe_plan(plan)
            for seq in plan.preempted:
                log.info("preempted request %d (%d tokens) for lack of KV-cache blocks; it runs again from the "
                         "head of the queue", seq.id, seq.num_tokens)
        if work:
            self.metrics.decode_batch.observe(len(work))
            self._in_flight = self._launch(work, previous)
        if previous is not None:
            self._settle(previous)
        if not self.runner.can_chain:
            self._settle()
        self.metrics.observe_schedule(self.scheduler)
        if not work and self.scheduler.waiting:
            # Everyone waiting needs an adapter slot, or blocks, that running requests still hold.
            self._wake.wait(0.005)
            self._wake.clear()

    def _observe_host_gap(self) -> None:
        """Host time the device waited for: zero while a pass is in flight."""
        if self._in_flight is not None:
            self.metrics.host_gap.observe(0.0)
        elif self._ready_at is not None:
            self.metrics.host_gap.observe(time.monotonic() - self._ready_at)

    def _fail(self, seqs: list[Sequence]) -> None:
        log.exception("forward pass failed for %d requests", len(seqs))
        for seq in seqs:
            if seq.finish_reason is None:
                self._finish(seq, None, error=ServingError("the server failed while running this request"))

    def _launch(self, work: list[Work], fed: DecodePass | None) -> DecodePass | None:
        self._observe_host_gap()
        try:
            launched = self.runner.launch(work, fed)
        except Exception:  # noqa: BLE001 - a failed pass fails its requests, not the server
            self._fail([w.seq for w in work])
            return None
        self.scheduler.advance(work)
        return launched

    def _settle(self, decode_pass: DecodePass | None = None) -> None:
        """Waits for a launched pass (default: the one in flight) and advances its requests."""
        if decode_pass is None:
            decode_pass, self._in_flight = self._in_flight, None
        if decode_pass is None:
            return
        try:
            tokens, logprobs = self.runner.collect(decode_pass)
        except Exception:  # noqa: BLE001
            self._fail(decode_pass.seqs)
            return
        self._advance_all(decode_pass.seqs, tokens, logprobs)

    def _advance_all(self, seqs: list[Sequence], tokens: list[int], logprobs: dict[int, TokenLogprob]) -> None:
        now = self._ready_at = time.monotonic()
        for row, (seq, token) in enumerate(zip(seqs, tokens)):
            if seq.finish_reason is None:    # a request that ended while this pass ran gets no more tokens
                if row in logprobs:
                    seq.logprobs.append(logprobs[row])
                try:
                    self._advance(seq, token, now)
                except Exception:  # noqa: BLE001 - e.g. a grammar that refuses its own token: this row alone fails
                    log.exception("advancing request %d failed", seq.id)
                    self._finish(seq, None, error=ServingError("the server failed while running this request"))

    def _advance(self, seq: Sequence, token: int, now: float) -> None:
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.output_ids.append(token)
        if token in self.eos_ids:
            self._finish(seq, FinishReason.END_OF_SEQUENCE)
            return
        # The grammar is complete once nothing but a stop token may follow: the row ends there.
        complete = seq.grammar is not None and seq.grammar.accept(token)
        piece, stopped = seq.text.push(token)
        if stopped or complete:
            self._finish(seq, FinishReason.STOP, piece=piece + (seq.text.flush() if complete and not stopped else ""))
        elif len(seq.output_ids) >= seq.params.max_tokens:
            self._finish(seq, FinishReason.LENGTH, piece=piece)
        elif piece or seq.logprobs or seq.prompt_logprobs:
            seq.events.put(self._event(seq, piece))

    @staticmethod
    def _event(seq: Sequence, piece: str, reason: FinishReason | None = None,
               error: ServingError | None = None) -> Event:
        """The next event of `seq`, with the logprobs not sent yet (the prompt's on the first)."""
        logprobs, prompt = tuple(seq.logprobs), seq.prompt_logprobs or ()
        seq.logprobs.clear()
        seq.prompt_logprobs = None
        return Event(piece, reason, len(seq.output_ids), error, logprobs, seq.index, prompt)

    def _finish(self, seq: Sequence, reason: FinishReason | None, piece: str = "",
                error: ServingError | None = None) -> None:
        # Cancelled requests were already taken out of the schedule by take_cancelled.
        if seq in self.scheduler.running:
            self.scheduler.finish(seq)
        seq.finish_reason = reason or FinishReason.CANCELLED
        if reason in (FinishReason.END_OF_SEQUENCE, FinishReason.LENGTH):
            piece += seq.text.flush()
        seq.events.put(self._event(seq, piece, seq.finish_reason, error))
        self.metrics.finished(seq, failed=error is not None)
        if seq.adapter is not None:
            self.registry.drop_hold(seq.adapter)
            self._forget_if_unused(seq.adapter)   # it may have finished after its name or version moved on

    def _forget_if_unused(self, adapter: RegisteredAdapter) -> None:
        """Removes the metric series of `adapter`'s name, and of its store version, once nothing registered or
        running uses them, so labels stay bounded (versions: live and asked for as name@vN only)."""
        if not self.registry.contains(adapter.name):
            self.metrics.forget_adapter(adapter.name)
        if adapter.version is not None and not self.registry.version_in_use(adapter.store_name, adapter.version):
            self.metrics.forget_version(adapter.store_name, adapter.version)
