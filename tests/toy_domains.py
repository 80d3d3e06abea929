"""Two toy domains and quickly trained teachers for distillation tests (plain PyTorch SFT, seconds on a CPU)."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def add_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in
            ((rng.randrange(10), rng.randrange(10)) for _ in range(n))]


def copy_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(3)) for _ in range(n)]
    return [{"prompt": f"copy {w}", "answer": w} for w in words]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_teacher(base: Path, out: Path, rows: list[dict], steps: int = 300, lr: float = 3e-3, seed: int = 0) -> Path:
    """SFT on (prompt, answer) pairs with the chat template, loss on the answer and EOS only."""
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    examples = []
    for row in rows:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=True,
                                               add_generation_prompt=True, return_dict=False)
        answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((prompt, answer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    for _ in range(steps):
        batch = rng.sample(examples, min(64, len(examples)))
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        for row, (p, a) in enumerate(batch):
            ids[row, :len(p) + len(a)] = torch.tensor(p + a)
            labels[row, len(p):len(p) + len(a)] = torch.tensor(a)
        loss = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
