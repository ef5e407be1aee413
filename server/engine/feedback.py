"""Ratings of answers (gRPC Feedback, HTTP POST /v1/feedback), counted for the stored version that answered.

The server remembers which version answered each request in a bounded book: the last MAX_ANSWERS request
ids, each for ANSWER_TTL_S, the oldest dropped first. Memory stays fixed (about 200 bytes an id) whatever
the traffic; a rating for an id no longer there is NOT_FOUND, as for one never seen.
"""
from __future__ import annotations

import math
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from ..errors import InvalidArgument, NotFound
from .version_metrics import VersionMetrics

MIN_SCORE, MAX_SCORE = -1.0, 1.0
MAX_ANSWERS = 65_536
ANSWER_TTL_S = 3600.0
TAG = re.compile(r"[A-Za-z0-9._-]{1,32}")
MAX_REQUEST_ID_CHARS = 128


@dataclass(slots=True)
class Answer:
    name: str        # the store name
    version: int     # the version that answered
    label: str       # its metric label: vN, or "other" when the request pinned it
    at: float        # time.monotonic() when it ended
    score: float | None = None    # its rating so far: a later one replaces it, so one answer counts once


def check_rating(request_id: str, score: float, tag: str) -> None:
    """INVALID_ARGUMENT for a rating out of range, before its request id is looked up."""
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) \
            or not MIN_SCORE <= score <= MAX_SCORE:
        raise InvalidArgument(f"score must be a number from {MIN_SCORE:g} to {MAX_SCORE:g}, got {score!r}",
                              field="score")
    if tag and not TAG.fullmatch(tag):
        raise InvalidArgument(f"tag must be 1 to 32 letters, digits, '.', '_' or '-', got {tag[:40]!r}", field="tag")
    if not request_id or len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(f"request_id must be 1 to {MAX_REQUEST_ID_CHARS} characters", field="request_id")


class FeedbackBook:
    def __init__(self, metrics: VersionMetrics, capacity: int = MAX_ANSWERS, ttl: float = ANSWER_TTL_S):
        self.metrics, self.capacity, self.ttl = metrics, capacity, ttl
        self._answers: OrderedDict[str, Answer] = OrderedDict()    # oldest first
        self._lock = threading.Lock()

    def answered(self, request_id: str, name: str, version: int, label: str) -> None:
        """Called by the engine as a request from a stored version ends."""
        now = time.monotonic()
        with self._lock:
            self._answers[request_id] = Answer(name, version, label, now)
            while len(self._answers) > self.capacity:
                self._answers.popitem(last=False)

    def rate(self, request_id: str, score: float, tag: str = "") -> str:
        """Counts the rating for the version that answered `request_id`; returns it as name@vN."""
        check_rating(request_id, score, tag)
        with self._lock:
            answer = self._find(request_id)
            earlier, answer.score = answer.score, float(score)
            self.metrics.rated(answer.name, answer.label, float(score), tag, replaces=earlier)
        return f"{answer.name}@v{answer.version}"

    def _find(self, request_id: str) -> Answer:
        """Under the lock."""
        now = time.monotonic()
        while self._answers:     # expired ones first: they are the oldest
            oldest = next(iter(self._answers.values()))
            if now - oldest.at <= self.ttl:
                break
            self._answers.popitem(last=False)
        answer = self._answers.get(request_id)
        if answer is None:
            raise NotFound(f"request {request_id[:MAX_REQUEST_ID_CHARS]!r} is not among the answers this server "
                           f"gave from a stored adapter version in the last {self.ttl / 60:g} minutes (it keeps "
                           f"the last {self.capacity}); feedback is counted per version", field="request_id")
        return answer
