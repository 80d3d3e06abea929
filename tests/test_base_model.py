"""The tiny base model: deterministic, a lossless character tokenizer, loads in transformers and vLLM."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from controller.cli import app
from specialists.base_model import TinyModelShape, init_base_model


def test_same_seed_same_weights(tmp_path: Path, tiny_model_dir: Path) -> None:
    again = init_base_model(tmp_path / "again", seed=0)
    other = init_base_model(tmp_path / "other", seed=1)
    ref = load_file(tiny_model_dir / "model.safetensors")
    same = load_file(again / "model.safetensors")
    different = load_file(other / "model.safetensors")
    assert ref.keys() == same.keys() and "lm_head.weight" in ref  # untied head: distillation needs it apart
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    assert not torch.equal(ref["model.embed_tokens.weight"], different["model.embed_tokens.weight"])


def test_tokenizer_is_character_level_and_lossless(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = string.printable.replace("\t", "").replace("\r", "").replace("\x0b", "").replace("\x0c", "")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id not in ids
    assert len(tokenizer) <= TinyModelShape.vocab_size
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "2+3="}, {"role": "assistant", "content": "5"}], tokenize=False)
    assert chat == "<|user|>2+3=\n<|assistant|>5</s>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "2+3="}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|user|>2+3=\n<|assistant|>"
    assert tokenizer.convert_tokens_to_ids("</s>") == tokenizer.eos_token_id


def test_tool_turns_render_and_earlier_ids_stay(tiny_model_dir: Path) -> None:
    """An agent trajectory's tool turn has its own role token, added after the characters: every id the
    tokenizer had before it stays, so a seed's model and every non-agent prompt tokenize as they did."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat = tokenizer.apply_chat_template([
        {"role": "user", "content": "12*34?"},
        {"role": "assistant", "content": '<tool_call name="python">print(12*34)</tool_call>'},
        {"role": "tool", "content": "408"}, {"role": "assistant", "content": "408"}], tokenize=False)
    assert chat == '<|user|>12*34?\n<|assistant|><tool_call name="python">print(12*34)</tool_call></s>' \
        "<|tool|>408\n<|assistant|>408</s>"
    tool = tokenizer.convert_tokens_to_ids("<|tool|>")
    assert tokenizer("<|tool|>", add_special_tokens=False)["input_ids"] == [tool]
    assert tool == len(tokenizer) - 1 and tokenizer.convert_tokens_to_ids("0") == 7  # after <|assistant|> (6)


def test_head_dim_must_suit_vllm_cpu() -> None:
    with pytest.raises(ValueError, match="must be 32 or 64"):
        TinyModelShape(hidden_size=64, num_attention_heads=4)


def test_cli_base_init(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["base", "init", str(tmp_path / "m"), "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "tokenizer.json").exists()
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(app, ["base", "init", str(tmp_path / "file")])
    assert result.exit_code == 1 and "exists and is not a directory" in result.stderr


def test_transformers_and_vllm_agree_on_greedy_tokens(tiny_model_dir: Path, vllm_engine) -> None:
    from vllm import SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    prompts = ["12+30=", "<|user|>write hello\n<|assistant|>", "abc"]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outputs = vllm_engine.llm.generate([{"prompt_token_ids": tokenizer(p)["input_ids"]} for p in prompts], params)
    for prompt, output in zip(prompts, outputs, strict=True):
        ids = tokenizer(prompt, return_tensors="pt")
        hf = model.generate(**ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        hf_tokens = hf[0, ids["input_ids"].shape[1]:].tolist()
        assert list(output.outputs[0].token_ids) == hf_tokens, prompt
