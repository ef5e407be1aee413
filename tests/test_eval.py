"""`cartridge eval` as a user runs it: any peft adapter, any JSONL data, the base alone as reference."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from adapters.formats.chat import render_prompt

from .conftest import make_peft_adapter
from .test_train import cartridge, write_lines

QUESTION = "Answer with one word: what colour is the sky on a clear day?"


def greedy_answer(base_model, tokenizer, question: str) -> str:
    """What the base itself answers, greedily and to its end-of-turn token."""
    ids = torch.tensor([render_prompt(tokenizer, [{"role": "user", "content": question}])])
    with torch.no_grad():
        out = base_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    assert tokenizer.eos_token_id in new, "pick a question the base answers briefly"
    return tokenizer.decode(new[:new.index(tokenizer.eos_token_id)], skip_special_tokens=True)


@pytest.fixture(scope="module")
def random_adapter(base_model, tmp_path_factory) -> Path:
    return make_peft_adapter(base_model, tmp_path_factory.mktemp("eval") / "qv4", 4, ["q_proj", "v_proj"], seed=7)


def test_exact_match_counts_answers_given_word_for_word(base_model, tokenizer, random_adapter, tmp_path):
    answer = greedy_answer(base_model, tokenizer, QUESTION)
    checkable = write_lines(tmp_path / "checkable.jsonl", [
        json.dumps({"instruction": QUESTION, "output": answer}),
        json.dumps({"messages": [{"role": "user", "content": QUESTION},
                                 {"role": "assistant", "content": answer + " and green"}]}),
    ])
    text = write_lines(tmp_path / "text.jsonl", [json.dumps({"text": "The quick brown fox jumps over the lazy dog."})])
    figures_file = tmp_path / "figures.json"
    result = cartridge("eval", "--adapter", str(random_adapter), "--data", str(checkable), str(text),
                       "--general-eval-tokens", "256", "--output", str(figures_file))
    assert result.returncode == 0, result.stderr
    figures = json.loads(figures_file.read_text())

    on_checkable, on_text = figures["data"]
    assert on_checkable["base"]["exact_match"] == 0.5, "the base gives its own answer, not the altered one"
    assert 0 <= on_checkable["adapter"]["exact_match"] <= 1
    assert on_text["base"]["exact_match"] is None, "raw text has no answer to check"
    for entry in (on_checkable, on_text, figures["general_text"]):
        for side in ("base", "adapter"):
            assert entry[side]["perplexity"] == pytest.approx(math.exp(entry[side]["loss"]))
    # A random adapter is a different model: its perplexity differs from the base's.
    assert figures["general_text"]["adapter"]["loss"] != pytest.approx(figures["general_text"]["base"]["loss"])
    assert figures["base"]["quantization"] == "none"
    assert "50.0% ->" in result.stdout and "general text" in result.stdout


def test_eval_refuses_what_the_server_would_refuse(random_adapter, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((random_adapter / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    data = write_lines(tmp_path / "data.jsonl", [json.dumps({"text": "Some text to measure."})])
    result = cartridge("eval", "--adapter", str(pickled), "--data", str(data), "--general-eval-tokens", "256")
    assert result.returncode == 2 and "adapter_model.bin, a pickle, which is never loaded" in result.stderr

    bad = write_lines(tmp_path / "bad.jsonl", ['{"text": ""}'])
    result = cartridge("eval", "--adapter", str(random_adapter), "--data", str(bad))
    assert result.returncode == 2 and "line 1: text: empty" in result.stderr



def test_exact_match_from_one_forward_pass_is_what_greedy_decoding_gives(base_model, tokenizer, tmp_path):
    """Recall and eval judge exact match from the teacher-forced pass, decoding only where it cannot tell; row by
    row that must be the verdict of decoding greedily and comparing the text, on the shipped records adapter."""
    import copy

    from adapters.train.datasets import read_dataset
    from adapters.eval.evaluate import answer_scores, exact_match, greedy_answers, greedy_matches
    from adapters.lora_model import with_saved_lora

    root = Path(__file__).resolve().parent.parent / "adapters"
    lines = [json.loads(line) for line in (root / "sample_data" / "records" / "train.jsonl").read_text().splitlines()[:8]]
    # Two answers it will not give: one changed inside, one cut short (decoding must also stop where it should).
    lines[6]["output"] = lines[6]["output"].replace("}", ', "note": "none"}')
    lines[7]["output"] = lines[7]["output"][:-1]
    data = write_lines(tmp_path / "rows.jsonl", [json.dumps(line) for line in lines])
    rows = read_dataset([str(data)], tokenizer, 256, 0).examples
    model = with_saved_lora(copy.deepcopy(base_model), root / "examples" / "records")

    answers = greedy_answers(model, tokenizer, rows, 8)
    decoded = [answer.strip() == row.answer.strip() for answer, row in zip(answers, rows)]
    scores = answer_scores(model, rows, 8, tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert greedy_matches(model, tokenizer, rows, scores, 8) == decoded, answers
    assert True in decoded and decoded[6:] == [False, False], f"both verdicts are needed: {decoded}"
    assert exact_match(model, tokenizer, rows, 8) == sum(decoded) / len(rows)
