"""Shadow rows (`cartridge release NAME@vN --shadow PCT`): a share of a name's requests also runs on the shadow
version, as one more row in the same batches, and nobody receives its answer. When both rows of a pair have
ended, a thread of its own (never the engine's) records how they compare: token counts, finish reasons,
latency and, for greedy requests, whether the texts agree exactly and their normalised edit distance (over
tokens: Levenshtein distance / the longer length, 0 = same, 1 = nothing alike).

Shadow rows give way to live ones (Scheduler.shadows_to_shed): they are shed, and counted, whenever live rows wait
for the room they hold. A pair whose shadow was shed, or either row failed or was cancelled, is not recorded.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from .sequence import FinishReason, Sequence

log = logging.getLogger(__name__)


class Discard:
    """A shadow row's event sink: its answer goes nowhere."""

    def put(self, event) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Row:
    tokens: list[int]
    finish: FinishReason
    seconds: float


class ShadowPair:
    """A live row and its shadow copy; each reports its end once."""

    def __init__(self, live: Sequence, shadow: Sequence):
        self.live, self.shadow = live, shadow
        self._ended: dict[bool, Row | None] = {}     # by seq.shadow; None: failed, cancelled or shed
        self._lock = threading.Lock()

    def ended(self, seq: Sequence, now: float, answered: bool) -> tuple[Row, Row] | None:
        """(live, shadow) once both rows have ended and both answered; None until then, or if one did not."""
        row = Row(list(seq.output_ids), seq.finish_reason, now - seq.arrival_time) if answered else None
        with self._lock:
            self._ended[seq.shadow] = row
            if len(self._ended) < 2 or None in self._ended.values():
                return None
            return self._ended[False], self._ended[True]


def shadow_copy(seq: Sequence, adapter, text_stream) -> Sequence:
    """The shadow row of live row `seq`, on `adapter` (the shadow version): same prompt, same sampling."""
    copy = Sequence(list(seq.prompt_ids), seq.params, adapter, text_stream, shadow=True, events=Discard(),
                    request_id=f"{seq.request_id}-shadow")
    seq.pair = copy.pair = ShadowPair(seq, copy)
    return copy


def edit_distance(a: list[int], b: list[int]) -> float:
    """Levenshtein distance of two token lists over the longer length: 0 same, 1 nothing alike."""
    if not a and not b:
        return 0.0
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1] / max(len(a), len(b))


class ShadowMetrics:
    """Pairs by adapter and shadow version, summed so any number of servers add up (`cartridge canary`)."""

    def __init__(self, registry: CollectorRegistry):
        r, labels = registry, ["adapter", "version"]
        self.pairs = Counter("cartridge_shadow_pairs", "Live/shadow pairs recorded", labels, registry=r)
        self.shed = Counter("cartridge_shadow_shed", "Shadow rows shed so live rows could run", labels, registry=r)
        self.greedy = Counter("cartridge_shadow_greedy_pairs", "Pairs of greedy requests (texts compared)", labels,
                              registry=r)
        self.exact = Counter("cartridge_shadow_exact", "Greedy pairs whose texts are the same", labels, registry=r)
        self.distance = Gauge("cartridge_shadow_edit_distance_sum", "Sum over greedy pairs of the normalised token "
                              "edit distance (0 same, 1 nothing alike)", labels, registry=r)
        self.same_finish = Counter("cartridge_shadow_same_finish", "Pairs that ended for the same reason", labels,
                                   registry=r)
        self.live_tokens = Counter("cartridge_shadow_live_tokens", "Tokens the live rows of pairs generated", labels,
                                   registry=r)
        self.tokens = Counter("cartridge_shadow_tokens", "Tokens the shadow rows of pairs generated", labels,
                              registry=r)
        self.live_seconds = Gauge("cartridge_shadow_live_seconds_sum", "Latency of the live rows of pairs", labels,
                                  registry=r)
        self.seconds = Gauge("cartridge_shadow_seconds_sum", "Latency of the shadow rows of pairs", labels, registry=r)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._record_loop, name="shadow-pairs", daemon=True).start()

    def ended(self, seq: Sequence, now: float, answered: bool) -> None:
        """Called by the engine as either row of a pair ends; the comparison runs on this class's thread."""
        rows = seq.pair.ended(seq, now, answered)
        if rows is not None:
            shadow = seq.pair.shadow
            self._queue.put((shadow.adapter.store_name, f"v{shadow.adapter.version}", rows,
                             seq.params.temperature == 0, shadow.text))

    def count_shed(self, seq: Sequence) -> None:
        self.shed.labels(seq.adapter.store_name, f"v{seq.adapter.version}").inc()

    def forget(self, name: str, version: int) -> None:
        for metric in (self.pairs, self.shed, self.greedy, self.exact, self.distance, self.same_finish,
                       self.live_tokens, self.tokens, self.live_seconds, self.seconds):
            metric.remove_by_labels({"adapter": name, "version": f"v{version}"})

    def _record_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                self._record(*item)
            except Exception:  # noqa: BLE001 - a bad pair must not stop the recorder
                log.exception("recording a shadow pair failed")

    def _record(self, name: str, version: str, rows: tuple[Row, Row], greedy: bool, text_stream) -> None:
        live, shadow = rows
        self.pairs.labels(name, version).inc()
        self.same_finish.labels(name, version).inc(live.finish == shadow.finish)
        self.live_tokens.labels(name, version).inc(len(live.tokens))
        self.tokens.labels(name, version).inc(len(shadow.tokens))
        self.live_seconds.labels(name, version).inc(live.seconds)
        self.seconds.labels(name, version).inc(shadow.seconds)
        if greedy:
            same = text_stream.decode(live.tokens) == text_stream.decode(shadow.tokens)
            self.greedy.labels(name, version).inc()
            self.exact.labels(name, version).inc(same)
            self.distance.labels(name, version).inc(0.0 if same else edit_distance(live.tokens, shadow.tokens))
