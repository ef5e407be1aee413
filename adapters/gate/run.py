"""One gate run: the candidate against the live version (or the base) on every suite, general text and
general sets, with one load of the base, then the verdict and its report files."""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..formats.base_checkpoint import cache_root, resolve_base
from ..formats.base_fingerprint import base_fingerprint
from ..general_text import general_text
from ..lora_model import pick_device
from ..train.report import REPORT_FILE, library_versions
from . import general_sets
from .checks import general_set_check, general_text_checks, suite_check
from .config import SEPARATING_SETS, GateConfig, GateConfigError
from .report import GateReport
from .cached_scores import CachedScores
from .score_cache import ScoreCache, model_identity
from .scoring import BASE, CANDIDATE, LIVE, GateModels, ItemScores, decode_answers
from .suites import GateSuite, read_suite

_GENERAL_TEXT_BATCH = 2  # windows of 256 tokens: each model's log-probs are [2, 255, 49152] floats, 100 MB


def run_gate(candidate: Path, live: Path | None, base_model: str | None, suites: list[GateSuite],
             config: GateConfig, out_dir: Path) -> GateReport:
    """Scores, checks and writes report.json, report.md and report.png into `out_dir`."""
    from transformers import AutoTokenizer

    started = time.monotonic()
    torch.manual_seed(config.seed)
    device = pick_device(config.device)
    base_dir = resolve_base(base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    warnings: list[str] = []
    # Everything that can be wrong with the inputs is found before the model loads.
    items = [read_suite(suite, config.rule(suite.name), tokenizer, config.max_seq_len, config.seed)
             for suite in _with_user_suites(suites, config)]
    choice_sets = _general_sets(config, warnings)
    general = general_text(tokenizer, config.general_text.tokens)
    quantized = _quantized(candidate, config)

    models = GateModels(base_dir, candidate, live, quantized, device)
    fingerprint = base_fingerprint(base_dir)
    identities = {BASE: model_identity(fingerprint, None, quantized),
                  CANDIDATE: model_identity(fingerprint, candidate, quantized)}
    if live is not None:
        identities[LIVE] = model_identity(fingerprint, live, quantized)
    reference = LIVE if live is not None else BASE
    scores = CachedScores(models, tokenizer, identities, ScoreCache(cache_root() / "gate-scores", config.reuse_scores),
                          config.batch_size, config.max_seq_len, config.extra_answer_tokens)
    checks = []
    for suite_items in items:
        scored = {name: scores.suite(name, suite_items) for name in (reference, CANDIDATE)}
        checks.append(suite_check(suite_items, reference, _with_flip_answers(models, tokenizer, suite_items, scored,
                                                                             reference, config), config))
    checks += general_text_checks(scores.text(general, _GENERAL_TEXT_BATCH), reference, config)
    for choice_set in choice_sets:
        chosen = {name: scores.choices(name, choice_set) for name in models.names}
        checks.append(general_set_check(choice_set, reference, chosen, config))
    from_cache = scores.from_cache

    data = ([{"file": str(s.suite.path), "sha256": s.sha256, "role": s.suite.role, "items": len(s.examples),
              "rows_usable": s.rows, "scores_from_cache": from_cache.get(f"suite:{s.suite.name}", [])} for s in items]
            + [{**s.provenance, "items": len(s.items), "scores_from_cache": from_cache.get(f"set:{s.source.name}", [])}
               for s in choice_sets]
            + [{"file": general.source, "sha256": general.fingerprint, "licence": "Python Software Foundation "
                "License (Python's own standard library)", "items": len(general.examples),
                "scores_from_cache": from_cache.get("text", [])}])
    report = GateReport(
        candidate=str(candidate), live=str(live) if live is not None else None,
        base={"path": str(base_dir), "fingerprint": fingerprint,
              "quantization": "nf4" if quantized else "none", "device": str(device)},
        checks=tuple(checks), data=tuple(data), settings=_settings(config), warnings=tuple(warnings),
        duration_s=time.monotonic() - started, libraries=library_versions())
    report.write(out_dir)
    return report


def _with_flip_answers(models: GateModels, tokenizer, items, scores: dict[str, ItemScores], reference: str,
                       config: GateConfig) -> dict[str, ItemScores]:
    """Scores whose right-to-wrong items carry both answers, for a person to read: exact-match suites are
    judged without decoding, so the candidate's answers to those items are decoded here."""
    before, after = scores[reference], scores[CANDIDATE]
    flipped = [i for i, (was, now) in enumerate(zip(before.correct, after.correct)) if was and not now]
    if not flipped or after.answers[flipped[0]] is not None:
        return scores
    with models.use(CANDIDATE) as model:
        answers = decode_answers(model, tokenizer, items, flipped, config.batch_size, config.extra_answer_tokens)
    # A reference that reproduced the answer token for token answered exactly the answer.
    return {reference: before.with_answers({i: items.examples[i].answer.strip() for i in flipped}),
            CANDIDATE: after.with_answers(answers)}


def _with_user_suites(suites: list[GateSuite], config: GateConfig) -> list[GateSuite]:
    """The suites given, then those the gate file lists with a path (gated as retained)."""
    names = {suite.name for suite in suites}
    if len(names) != len(suites):
        raise GateConfigError("two suites share a name; the report names suites, so each needs its own")
    return [*suites, *(GateSuite(rule.name, rule.path, "retained") for rule in config.suites
                       if rule.path is not None and rule.name not in names)]


def _general_sets(config: GateConfig, warnings: list[str]) -> list[general_sets.ChoiceSet]:
    if not config.general_sets.sets:
        return []
    if not general_sets.available() and config.general_sets.sets == SEPARATING_SETS:
        # The defaults fall back to the general text, which needs no data; sets the user asked for do not.
        warnings.append(f"general multiple-choice sets skipped: {general_sets.WHEEL_NAME} is not in the cache; "
                        f"{general_sets.FETCH_HINT}")
        return []
    loaded = general_sets.load_sets(config.general_sets.sets)
    return [general_sets.sample(choice_set, config.general_sets.items, config.seed) for choice_set in loaded]


def _quantized(candidate: Path, config: GateConfig) -> bool:
    if config.quantization != "auto":
        return config.quantization == "nf4"
    try:
        trained = json.loads((candidate / REPORT_FILE).read_text())["hyperparameters"]
    except (OSError, ValueError, KeyError):
        return False
    return trained.get("method") == "qlora"


def _settings(config: GateConfig) -> dict:
    settings = asdict(config)
    settings["suites"] = [{**rule, "path": str(rule["path"]) if rule["path"] else None}
                          for rule in settings["suites"]]
    return settings
