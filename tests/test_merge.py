"""`cartridge merge` as a user runs it: adapters folded into the embedded base, checked against peft."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from adapters.merge.merge import WeightsSource
from adapters.merge.verify import verify_merge
from client.cli import main as cartridge_main

from .conftest import PROMPT, make_peft_adapter


def cartridge_merge(*args: str, umask: int = -1) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client.cli", "merge", *args], capture_output=True, text=True,
                          timeout=300, umask=umask)


def modes(directory: Path) -> dict[str, int]:
    """Permission bits of a directory and of everything below it, by path relative to it."""
    return {str(p.relative_to(directory)): p.stat().st_mode & 0o777 for p in (directory, *directory.rglob("*"))}


def load(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def max_weight_diff(model, reference) -> float:
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    return max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours)


def greedy(model, tokenizer, new_tokens: int = 10) -> list[int]:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def staging_left_in(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".merging-" in p.name or ".replaced-" in p.name]


@pytest.fixture(scope="module")
def merged_fp32(tmp_path_factory, adapter_dirs) -> tuple[Path, subprocess.CompletedProcess]:
    """all16-rs (rsLoRA, every projection) merged in float32, in several shards, verified by default; under
    umask 027, which the export's modes must follow."""
    out = tmp_path_factory.mktemp("merged") / "all16-rs-fp32"
    result = cartridge_merge("--adapter", str(adapter_dirs["all16-rs"]), "--out", str(out), "--dtype", "fp32",
                             "--max-shard-size", "200MB", umask=0o027)
    return out, result


def test_merge_equals_peft_merge_and_unload_and_loads_without_peft(merged_fp32, base_model, tokenizer, adapter_dirs):
    from peft import PeftModel

    out, result = merged_fp32
    assert result.returncode == 0, result.stderr
    assert "verified: max |logit diff| merged vs base+adapters" in result.stdout
    assert "FutureWarning" not in result.stderr, result.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert index["metadata"]["merge.weights_source"] == "dense"
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert staging_left_in(out.parent) == []
    # As the umask says, like every other file: not mkdtemp's 0700 nor safetensors' 0600.
    found = modes(out)
    assert found == {name: 0o750 if name == "." else 0o640 for name in found}, {k: oct(v) for k, v in found.items()}

    merged = load(out)
    adapted = PeftModel.from_pretrained(copy.deepcopy(base_model), adapter_dirs["all16-rs"]).eval()
    tokens = greedy(merged, tokenizer)
    assert tokens == greedy(adapted, tokenizer)
    assert tokens != greedy(base_model, tokenizer)
    assert max_weight_diff(merged, adapted.merge_and_unload()) == 0.0


def test_merged_model_generates_what_the_server_serves_with_the_adapter(merged_fp32, server, tokenizer):
    from client.client import CartridgeClient

    out, result = merged_fp32
    assert result.returncode == 0, result.stderr
    with CartridgeClient(server.address, timeout=120) as client:
        served = client.generate(PROMPT, adapter="all16-rs", max_tokens=10)
    assert served.completion_tokens == 10
    assert tokenizer.decode(greedy(load(out), tokenizer), skip_special_tokens=True) == served.text


def test_weighted_bf16_merge_of_two_adapters_matches_peft_and_replaces_only_with_overwrite(
        tmp_path, capsys, base_model, adapter_dirs):
    from peft import PeftModel

    out = tmp_path / "mix"
    out.mkdir()
    (out / "notes.txt").write_text("an earlier export")
    args = ["--adapter", str(adapter_dirs["qv8"]), "--weight", "0.7", "--adapter", str(adapter_dirs["mlp4"]),
            "--weight", "0.3", "--out", str(out), "--no-verify"]

    assert cartridge_main(["merge", *args]) == 2
    assert f"--out {out} exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    result = cartridge_merge(*args, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not (out / "notes.txt").exists() and staging_left_in(tmp_path) == []
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    merged = load(out)

    # peft's own weighted sum of deltas: "cat" stacks weight * scaling * A and B over the summed rank.
    reference = PeftModel.from_pretrained(copy.deepcopy(base_model), adapter_dirs["qv8"], adapter_name="qv8")
    reference.load_adapter(adapter_dirs["mlp4"], adapter_name="mlp4")
    reference.add_weighted_adapter(["qv8", "mlp4"], [0.7, 0.3], "mix", combination_type="cat")
    reference.set_adapter("mix")
    expected = reference.merge_and_unload().to(torch.bfloat16)
    # The two sums round differently in float32 only now and then, so bf16 may differ by one step.
    assert max_weight_diff(merged, expected) <= 2 ** -8
    with safe_open(out / "model-00001-of-00001.safetensors", framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert json.loads(f.metadata()["merge.adapters"])[1]["weight"] == 0.3


def test_nf4_source_folds_into_the_weights_qlora_trains_against(tmp_path, base_dir, base_model, adapter_dirs):
    import bitsandbytes.functional as bnbf
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapters.formats.nf4 import bnb_config

    out = tmp_path / "nf4"
    result = cartridge_merge("--adapter", str(adapter_dirs["qv8"]), "--weights-source", "nf4", "--dtype", "fp32",
                             "--out", str(out), "--no-verify")
    assert result.returncode == 0, result.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["merge.weights_source"] == "nf4"
    assert index["metadata"]["merge.nf4_compute_dtype"] == "bfloat16"
    merged = load(out).state_dict()

    # What a QLoRA trainer sees: transformers' own 4-bit load of the base, dequantized, plus peft's delta.
    quantized = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=bnb_config(), dtype=torch.bfloat16)
    adapted = PeftModel.from_pretrained(copy.deepcopy(base_model), adapter_dirs["qv8"])
    layer, quantized_layer = adapted.base_model.model.model.layers[7], quantized.model.layers[7]
    for projection in ("q_proj", "v_proj", "o_proj"):
        linear = getattr(quantized_layer.self_attn, projection).weight
        expected = bnbf.dequantize_4bit(linear.data, linear.quant_state).float()
        lora = getattr(layer.self_attn, projection)
        if projection != "o_proj":       # not targeted by qv8: NF4 all the same, as the server serves it
            expected = expected + lora.get_delta_weight("default")
        ours = merged[f"model.layers.7.self_attn.{projection}.weight"]
        assert (ours - expected).abs().max().item() <= 1e-6, projection
    assert torch.equal(merged["model.norm.weight"], base_model.state_dict()["model.norm.weight"])


def test_verification_fails_for_a_model_that_is_not_base_plus_adapter(merged_fp32, base_dir, adapter_dirs):
    out, _ = merged_fp32
    # The merge of all16-rs passed verification when it was written (the fixture); against another
    # adapter the same directory must fail, by far.
    wrong = verify_merge(base_dir, [(adapter_dirs["qv8"], 1.0)], WeightsSource("dense", frozenset()), out,
                         torch.float32)
    assert not wrong.passed and wrong.max_logit_diff > 10 * wrong.tolerance


@pytest.fixture(scope="module")
def foreign_adapter(tmp_path_factory) -> Path:
    """A real peft adapter, made for a different (tiny) Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, vocab_size=49152))
    return make_peft_adapter(tiny, tmp_path_factory.mktemp("foreign") / "tiny", 4, ["q_proj", "v_proj"], seed=4)


@pytest.fixture(scope="module")
def pickled_adapter(tmp_path_factory, adapter_dirs) -> Path:
    """The same adapter saved the old way, as a pickle (adapter_model.bin) only."""
    from safetensors.torch import load_file

    directory = tmp_path_factory.mktemp("pickled") / "qv8-bin"
    directory.mkdir()
    (directory / "adapter_config.json").write_text((adapter_dirs["qv8"] / "adapter_config.json").read_text())
    torch.save(load_file(adapter_dirs["qv8"] / "adapter_model.safetensors"), directory / "adapter_model.bin")
    return directory


@pytest.fixture(scope="module")
def deeper_adapter(tmp_path_factory, adapter_dirs) -> Path:
    """qv8 as if made for a deeper model of the same width: its layer-0 weights moved to layer 40."""
    from safetensors.torch import load_file, save_file

    directory = tmp_path_factory.mktemp("deeper") / "qv8-layer40"
    directory.mkdir()
    (directory / "adapter_config.json").write_text((adapter_dirs["qv8"] / "adapter_config.json").read_text())
    tensors = load_file(adapter_dirs["qv8"] / "adapter_model.safetensors")
    save_file({k.replace(".layers.0.", ".layers.40."): v for k, v in tensors.items()},
              directory / "adapter_model.safetensors")
    return directory


@pytest.mark.parametrize("case, flags, message", [
    ("another base", ["--adapter", "{foreign}"], "the adapter was made for another base model"),
    ("a deeper base", ["--adapter", "{deeper}"], "has weights for layer 40, but the base has 30 layers"),
    ("pickled adapter", ["--adapter", "{pickled}"], "adapter_model.bin, a pickle, which is never loaded"),
    ("unknown dtype", ["--adapter", "{qv8}", "--dtype", "int8"], "--dtype must be one of bf16, fp16, fp32, got 'int8'"),
    ("unknown source", ["--adapter", "{qv8}", "--weights-source", "gptq"],
     "--weights-source must be one of dense, nf4"),
    ("weights miscounted", ["--adapter", "{qv8}", "--adapter", "{mlp4}", "--weight", "0.5"],
     "1 --weight for 2 --adapter"),
])
def test_refusals_name_the_problem_and_write_nothing(case, flags, message, tmp_path, capsys, adapter_dirs,
                                                     foreign_adapter, pickled_adapter, deeper_adapter):
    paths = {"foreign": foreign_adapter, "pickled": pickled_adapter, "deeper": deeper_adapter, **adapter_dirs}
    out = tmp_path / "out"
    code = cartridge_main(["merge", *[f.format(**paths) for f in flags], "--out", str(out)])
    assert code == 2, case
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_write_over_its_own_inputs(tmp_path, capsys, adapter_dirs):
    adapter = shutil.copytree(adapter_dirs["qv8"], tmp_path / "adapters" / "qv8")
    code = cartridge_main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "adapters"), "--overwrite"])
    assert code == 2
    assert f"would replace {adapter}, an input of this merge" in capsys.readouterr().err
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
