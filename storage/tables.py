"""Reading users' data files: JSONL or Parquet, through the `datasets` library, with errors that name the file."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def load_table(path: str, required: Sequence[str] = ()) -> Any:
    """A `datasets.Dataset` from a .jsonl/.json or .parquet file that has every `required` column."""
    from datasets import load_dataset

    kind = "parquet" if path.endswith(".parquet") else "json"
    try:
        data = load_dataset(kind, data_files=path, split="train")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such data file") from None
    for name in required:
        if name not in data.column_names:
            raise ValueError(f"{path}: no {name!r} column (columns: {data.column_names})")
    return data
