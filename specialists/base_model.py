"""Build the tiny base model every test and the demo start from.

Why: nothing may be downloaded at run time, yet transformers, TRL and vLLM all
need a real checkpoint. `init_base_model` writes one: a small Llama-architecture
causal LM with random weights and a character-level tokenizer over printable
ASCII and newline, in the transformers format (safetensors, tokenizer.json, a
chat template). The same seed gives the same bytes.

Run it: ``retort base init DIR --seed 0``.
"""

from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARACTERS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # printable ASCII + "\n"
# Added after the characters, so every earlier token keeps its id (and a seed its initial weights).
LATER_SPECIAL_TOKENS = ["<|tool|>"]  # a tool's result in an agent trajectory (rollout.agent)

# One turn per line pair; the assistant turn ends with </s>, which is the EOS token,
# so a generation stops exactly where an SFT target ends. A tool turn is context, like a user turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}\n"
    "{% elif message['role'] == 'tool' %}<|tool|>{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>"
    "{% generation %}{{ message['content'] }}</s>{% endgeneration %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class TinyModelShape:
    """Sizes of the tiny model; head_dim = hidden / heads must be 32 or 64 for vLLM's CPU attention."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048  # room for a judge prompt with a rubric
    vocab_size: int = 128  # padded above the tokenizer's 104 entries to a round number

    def __post_init__(self) -> None:
        head_dim, rest = divmod(self.hidden_size, self.num_attention_heads)
        if rest or head_dim not in (32, 64):
            raise ValueError(
                f"hidden_size / num_attention_heads must be 32 or 64 (vLLM's CPU attention), "
                f"got {self.hidden_size} / {self.num_attention_heads}"
            )


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per printable ASCII character or newline."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS + LATER_SPECIAL_TOKENS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIAL_TOKENS + LATER_SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[4:] + LATER_SPECIAL_TOKENS,
        clean_up_tokenization_spaces=False,
        model_max_length=TinyModelShape.max_position_embeddings,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def init_base_model(directory: str | Path, seed: int = 0, shape: TinyModelShape | None = None) -> Path:
    """Write a freshly initialised tiny Llama and its tokenizer to `directory`; returns it."""
    shape = shape or TinyModelShape()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    if len(tokenizer) > shape.vocab_size:
        raise ValueError(f"vocab_size {shape.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    config = LlamaConfig(
        **asdict(shape),
        head_dim=shape.hidden_size // shape.num_attention_heads,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,  # distillation splits trunk and head, so keep the head its own tensor
        torch_dtype="float32",  # bf16 is slow on AVX2 CPUs (vLLM falls back to reference kernels)
        initializer_range=0.02,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "retort_base.json").write_text(json.dumps({"seed": seed, "shape": asdict(shape)}, indent=2) + "\n")
    return out
