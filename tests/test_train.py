"""`cartridge train` as a user runs it: a YAML file plus flags, on the shipped sample data, on this CPU.

Runs are a few optimizer steps on a few dozen rows with short sequences, enough to see the validation
loss fall, and small enough for the whole file to take about two minutes on two cores.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapters.formats.adapter_dir import BaseShape, read_adapter
from adapters.formats.base_fingerprint import base_fingerprint
from adapters.formats.file_modes import current_umask

SAMPLES = Path(__file__).resolve().parent.parent / "adapters" / "sample_data"
# Settings that keep a run short: short sequences, little general text, tiny validation files.
QUICK = ["--batch-size", "4", "--max-seq-len", "96", "--general-eval-tokens", "256", "--learning-rate", "2e-3",
         "--recall-items", "8"]


def cartridge(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client.cli", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)


def sample_rows(domain: str, split: str, count: int) -> list[str]:
    return (SAMPLES / domain / f"{split}.jsonl").read_text().splitlines()[:count]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, Path, Path]:
    """(output, process, train file, validation file) of a 6-step LoRA run configured by a YAML file:
    40 fact rows with one bad row among them, validated on 6 new wordings of facts every 3 steps."""
    root = tmp_path_factory.mktemp("train")
    rows = sample_rows("facts", "train", 40)
    train_file = write_lines(root / "train.jsonl", rows[:20] + ['{"instruction": "No answer here"}'] + rows[20:])
    val_file = write_lines(root / "val.jsonl", sample_rows("facts", "val", 6))
    # Paths in the file are relative to it; the max_steps flag below overrides the file's 100.
    (root / "train.yaml").write_text("data: train.jsonl\nval_data: [val.jsonl]\nmax_steps: 100\neval_every: 3\n"
                                     "r: 8\nlora_alpha: 16\n")
    (root / "defaults.json").write_text('{"temperature": 0, "max_tokens": 32}')
    output = root / "adapter"
    result = cartridge("train", "--config", str(root / "train.yaml"), "--output", str(output), "--max-steps", "6",
                       "--defaults", str(root / "defaults.json"), *QUICK)
    return output, result, train_file, val_file


def report_of(output: Path) -> dict:
    return json.loads((output / "training_report.json").read_text())


def test_training_lowers_validation_loss_and_writes_a_peft_adapter(trained, base_dir):
    output, result, train_file, _ = trained
    assert result.returncode == 0, result.stderr
    assert json.loads((output / "cartridge.json").read_text()) == {"temperature": 0, "max_tokens": 32}   # --defaults
    assert "tokens_per_s" in result.stderr and "step 3: validation loss" in result.stdout
    assert "FutureWarning" not in result.stderr, result.stderr
    # Every phase after training says what it measures and how long it should take, then shows its rows.
    assert re.search(r"^measuring recall on 8 training rows; about \d+ s$", result.stdout, re.M), result.stdout
    assert re.search(r"^measuring forgetting: \d+ tokens of general text \(base and adapter\) and 6 validation rows "
                     r"\(base\); about \d+ s$", result.stdout, re.M), result.stdout
    for label, rows in (("recall", 8), ("validation, base", 6), ("general text, base", 1), ("general text, adapter", 1)):
        assert re.search(rf"{re.escape(label)}: 100%.*\| {rows}/{rows} \[\d\d:\d\d", result.stderr), label
    assert re.search(r"^6 steps in \d+ s \(\d+ s in all, with loading and measuring\)", result.stdout, re.M)
    assert f"skipped {train_file}, line 21: output: missing" in result.stdout

    assert {"adapter_config.json", "adapter_model.safetensors", "training_report.json",
            "loss_curves.png"} <= {p.name for p in output.iterdir()}
    assert (output / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in output.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")], "never pickle"
    # Readable as every other file is (safetensors alone writes 0600).
    assert (output / "adapter_model.safetensors").stat().st_mode & 0o777 == \
        (output / "adapter_config.json").stat().st_mode & 0o777 == 0o666 & ~current_umask()

    report = report_of(output)
    val_curve = report["loss_curve"]["validation"]
    assert [step for step, _ in val_curve] == [0, 3, 6]
    assert val_curve[-1][1] < val_curve[0][1], "validation loss must fall below the base's"
    # Without early stopping the last step's weights are kept (held-out loss would stop knowledge too soon).
    assert report["training"]["kept"] == "last step" and report["training"]["kept_step"] == 6
    assert report["final"]["validation_loss"] == pytest.approx(val_curve[-1][1], rel=1e-5)
    assert report["final"]["train_recall"]["items"] == 8 and 0 <= report["final"]["train_recall"]["exact_match"] <= 1
    assert [step for step, _ in report["loss_curve"]["train"]] == [1, 2, 3, 4, 5, 6]

    data = report["data"]
    file_hash = hashlib.sha256(train_file.read_bytes()).hexdigest()
    assert data["fingerprint"] == hashlib.sha256(file_hash.encode()).hexdigest()
    assert (data["rows_used"], data["rows_rejected"]) == (40, 1)
    assert data["rejected"] == [{"file": str(train_file), "line": 21, "reason": "output: missing"}]
    assert report["hyperparameters"]["max_steps"] == 6 and report["hyperparameters"]["r"] == 8
    assert report["hyperparameters"]["learning_rate"] == 2e-3
    assert "epochs" not in report["hyperparameters"] and "val_fraction" not in report["hyperparameters"]
    # What the server and eval compare an adapter's recorded base with.
    assert report["base"]["quantization"] == "none" and report["base"]["fingerprint"] == base_fingerprint(base_dir)
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= report["libraries"].keys()
    assert report["training"]["wall_time_s"] > 0 and report["training"]["peak_memory"]["host_rss_bytes"] > 0

    general = report["forgetting"]["general_text"]
    assert general["base"]["tokens"] == general["adapter"]["tokens"] > 200
    assert general["base"]["perplexity"] > 1 and general["adapter"]["perplexity"] > 1
    domain = report["forgetting"]["domain_validation"]
    assert domain["base"]["loss"] == pytest.approx(val_curve[0][1])

    # The server's own check, then peft: the adapter changes the base's output.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    read_adapter(output, BaseShape.from_config(base.config))
    model = PeftModel.from_pretrained(base, output).eval()
    ids = torch.tensor([[1, 504, 3458, 282, 260, 1934]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert not torch.allclose(adapted, plain, atol=1e-3)


def test_eval_gives_back_the_reports_figures(trained, tmp_path):
    output, _, _, val_file = trained
    figures_file = tmp_path / "figures.json"
    result = cartridge("eval", "--adapter", str(output), "--data", str(val_file), "--output", str(figures_file))
    assert result.returncode == 0, result.stderr
    figures, report = json.loads(figures_file.read_text()), report_of(output)
    # Unset options came from the report (max_seq_len 96, 256 general tokens), so the figures agree.
    domain = report["forgetting"]["domain_validation"]
    assert figures["data"][0]["adapter"]["loss"] == pytest.approx(domain["adapter"]["loss"], rel=1e-4)
    assert figures["data"][0]["base"]["loss"] == pytest.approx(domain["base"]["loss"], rel=1e-4)
    general = report["forgetting"]["general_text"]
    assert figures["general_text"]["fingerprint"] == general["fingerprint"]
    assert figures["general_text"]["adapter"]["perplexity"] == pytest.approx(general["adapter"]["perplexity"],
                                                                             rel=1e-4)
    assert 0 <= figures["data"][0]["adapter"]["exact_match"] <= 1
    assert str(val_file)[-40:] in result.stdout and "general text" in result.stdout


def test_resume_carries_on_from_the_checkpoint(trained, tmp_path):
    first, _, _, _ = trained
    output = tmp_path / "adapter"
    shutil.copytree(first, output)
    config = str(first.parent / "train.yaml")

    again = cartridge("train", "--config", config, "--output", str(output), "--max-steps", "8", *QUICK)
    assert again.returncode == 2 and "already holds a training run; pass --resume" in again.stderr

    other_rank = cartridge("train", "--config", config, "--output", str(output), "--max-steps", "8", "--r", "4",
                           "--resume", *QUICK)
    assert other_rank.returncode == 2 and "cannot resume: r was 8" in other_rank.stderr

    result = cartridge("train", "--config", config, "--output", str(output), "--max-steps", "8", "--eval-every", "2",
                       "--resume", *QUICK)
    assert result.returncode == 0, result.stderr
    assert "resuming from step 6 of 8" in result.stdout
    before, after = report_of(first), report_of(output)
    assert [step for step, _ in after["loss_curve"]["train"]] == list(range(1, 9))
    assert after["loss_curve"]["train"][:6] == before["loss_curve"]["train"]
    assert [step for step, _ in after["loss_curve"]["validation"]] == [0, 3, 6, 8]


def test_qlora_trains_against_the_nf4_base(tmp_path):
    output = tmp_path / "qlora"
    result = cartridge("train", "--method", "qlora", "--gradient-checkpointing", "--output", str(output),
                       "--max-steps", "2", "--eval-every", "2",
                       "--data", str(write_lines(tmp_path / "train.jsonl", sample_rows("facts", "train", 16))),
                       "--val-data", str(write_lines(tmp_path / "val.jsonl", sample_rows("facts", "val", 4))),
                       "--r", "4", *QUICK)
    assert result.returncode == 0, result.stderr
    assert "FutureWarning" not in result.stderr, result.stderr      # checkpointing through the current API
    report = report_of(output)
    assert report["base"]["quantization"] == "nf4" and report["hyperparameters"]["gradient_checkpointing"]
    curve = report["loss_curve"]["validation"]
    assert curve[-1][1] < curve[0][1]
    assert read_adapter(output).config.r == 4


def test_unusable_data_stops_the_run_before_anything_is_written(tmp_path):
    good = sample_rows("facts", "train", 3)
    data = write_lines(tmp_path / "bad.jsonl", [
        good[0],
        '{"instruction": "What is 2 + 2?", "output": "4"',
        '{"instruction": "Name a colour.", "input": "", "output": "   "}',
        '{"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "Hello"}]}',
        '{"messages": [{"role": "user", "content": "Hi"}]}',
        json.dumps({"instruction": "Repeat this. " + "word " * 200, "output": "word"}),
        '["not", "an", "object"]',
        good[1],
    ])
    output = tmp_path / "never"
    result = cartridge("train", "--data", str(data), "--output", str(output), "--max-seq-len", "96")
    assert result.returncode == 2
    assert "line 6:" in result.stderr.split("over max_seq_len 96")[0].splitlines()[-1]
    for expected in ("6 of 8 rows are unusable", "line 2: not valid JSON", "line 3: output: empty",
                     "line 4: messages[1]: role must be one of", "line 5: the last message must be the assistant's",
                     "over max_seq_len 96", "line 7: expected a JSON object"):
        assert expected in result.stderr
    assert not output.exists()

    missing = cartridge("train", "--data", str(tmp_path / "nowhere.jsonl"), "--output", str(output))
    assert missing.returncode == 2 and "nowhere.jsonl: no such data file" in missing.stderr
    assert not output.exists()


def test_bad_settings_are_named(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("data: x.jsonl\noutput: out\nlearning_rte: 0.001\n")
    typo = cartridge("train", "--config", str(config))
    assert typo.returncode == 2 and "unknown setting 'learning_rte'; did you mean 'learning_rate'?" in typo.stderr

    config.write_text("data: x.jsonl\noutput: out\nlora_dropout: 1.5\nuse_rslora: maybe\n")
    assert "use_rslora: expected true or false, got 'maybe'" in cartridge("train", "--config", str(config)).stderr
    dropout = cartridge("train", "--config", str(config), "--use-rslora")
    assert dropout.returncode == 2 and "lora_dropout: must be in [0, 1), got 1.5" in dropout.stderr
    # Replaying every earlier row is allowed; a mix of nothing but general text is not.
    general = cartridge("train", "--data", "x.jsonl", "--output", "out", "--replay-fraction", "1",
                        "--general-replay-fraction", "1")
    assert general.returncode == 2 and "general_replay_fraction: must be in [0, 1), got 1.0" in general.stderr
    assert "replay_fraction" not in general.stderr.replace("general_replay_fraction", "")

    (tmp_path / "defaults.json").write_text('{"colour": "red"}')
    defaults = cartridge("train", "--data", "x.jsonl", "--output", "out", "--defaults", str(tmp_path / "defaults.json"))
    assert defaults.returncode == 2 and "defaults: " in defaults.stderr and "'colour' is not a default" in defaults.stderr

    assert "data: required" in cartridge("train", "--output", str(tmp_path / "out")).stderr
    assert not (tmp_path / "out").exists()


def test_sample_data_is_the_generators_output(tmp_path):
    subprocess.run([sys.executable, "-m", "adapters.sample_domains", str(tmp_path)], check=True, capture_output=True)
    for shipped in SAMPLES.glob("*/*.jsonl"):
        generated = tmp_path / shipped.parent.name / shipped.name
        assert generated.read_bytes() == shipped.read_bytes(), f"{shipped} differs from the generator's output"
    assert {p.parent.name for p in SAMPLES.glob("*/test.jsonl")} == {"records", "facts", "directory"}


def test_rows_of_like_length_share_a_micro_batch_and_every_row_comes_once_an_epoch():
    from adapters.train.config import TrainConfig
    from adapters.train.datasets import Example
    from adapters.train.loop import micro_batches

    # A replay mix: one long record to every two short facts, as `--from` builds it.
    # Each row's tokens are its own number, so a batch shows which rows it holds.
    examples = [Example(prompt_ids=(i,) * (120 if i % 3 == 0 else 12), answer_ids=(i,) * 8, answer=None,
                        row=("mix", i)) for i in range(1, 97)]

    def one_epoch(group_by_length: bool) -> list:
        config = TrainConfig(data=("unused",), output="unused", batch_size=4, seed=0, group_by_length=group_by_length)
        stream = micro_batches(examples, config, skip=0, pad_id=0)
        return [next(stream) for _ in range(24)]

    def padding(batches: list) -> float:
        return sum(int((b.attention_mask == 0).sum()) for b in batches) / sum(b.attention_mask.numel() for b in batches)

    grouped, plain = one_epoch(True), one_epoch(False)
    print(f"\npadding: {padding(plain):.0%} of batch tokens in seeded order, {padding(grouped):.0%} grouped by length")
    assert padding(grouped) < 0.1 < padding(plain)
    assert sorted(int(row) for b in grouped for row in b.input_ids[:, 0]) == list(range(1, 97))
    widths = [b.input_ids.shape[1] for b in grouped]
    assert widths != sorted(widths, reverse=True), "long and short batches stay mixed through the epoch"
