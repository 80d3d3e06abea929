"""Read YAML spec files into strict pydantic models, with errors people can act on.

Every YAML a user writes (specialist jobs, distillation runs, rubrics, pipelines)
goes through `load_spec`. It reports *every* problem at once, each as
``file:line:col: key.path: what was expected (found: what was there)``, because a
traceback from inside pydantic or PyYAML tells a rubric author nothing.

How: PyYAML composes the document into a node tree that keeps source marks; we
map each key path to its line, validate the plain data with pydantic, then place
each pydantic error on the line of the deepest key path that exists in the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from storage.db import run_home

Loc = tuple[str | int, ...]
ModelT = TypeVar("ModelT", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every user-facing config: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec file, located as precisely as the file allows."""

    file: str
    line: int  # 1-based; 0 when the whole file is at fault
    column: int  # 1-based; 0 when unknown
    path: str  # dotted key path, e.g. "grpo.num_generations" or "criteria[2].weight"
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class SpecError(ValueError):
    """A spec file could not be read; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class FieldErrors(ValueError):
    """Raised by cross-field validators so each problem lands on its own key path and line.

    `problems` holds (path relative to the validated model, message) pairs.
    """

    def __init__(self, problems: list[tuple[Loc, str]]):
        self.problems = problems
        super().__init__("; ".join(message for _, message in problems))


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that keeps marks; duplicate keys are reported by `_check_duplicates`."""


def _format_path(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _index_marks(node: yaml.Node, loc: Loc, marks: dict[Loc, yaml.Mark]) -> None:
    """Record where each key path starts: the key's mark for mappings, the item's for lists."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                child = (*loc, key_node.value)
                marks[child] = key_node.start_mark
                _index_marks(value_node, child, marks)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            child = (*loc, i)
            marks[child] = item.start_mark
            _index_marks(item, child, marks)


def _check_duplicates(node: yaml.Node, loc: Loc, file: str, problems: list[Problem]) -> None:
    """PyYAML silently keeps the last of two equal keys; a spec author wants to know."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, yaml.Mark] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key = key_node.value
            if key in seen:
                m = key_node.start_mark
                problems.append(
                    Problem(file, m.line + 1, m.column + 1, _format_path((*loc, key)),
                            f"duplicate key (first given on line {seen[key].line + 1})")
                )
            else:
                seen[key] = key_node.start_mark
            _check_duplicates(value_node, (*loc, key), file, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, (*loc, i), file, problems)


def _user_loc(loc: Loc, marks: dict[Loc, yaml.Mark]) -> Loc:
    """Drop pydantic's union/tag segments (e.g. the discriminator value) from an error path.

    A segment is kept when the file has that path, or when it is the last one (a
    missing key, which by definition is not in the file).
    """
    kept: Loc = ()
    for i, part in enumerate(loc):
        if kept and kept in marks and not any(len(m) > len(kept) and m[:len(kept)] == kept for m in marks):
            return (*kept, *loc[i:])  # a leaf of the file (a pipeline's included file name): the rest is in there
        candidate = (*kept, part)
        if candidate in marks or i == len(loc) - 1 or isinstance(part, int):
            kept = candidate
    return kept


def _locate(loc: Loc, marks: dict[Loc, yaml.Mark]) -> tuple[int, int]:
    for end in range(len(loc), -1, -1):
        mark = marks.get(loc[:end])
        if mark is not None:
            return mark.line + 1, mark.column + 1
    return 0, 0


def _describe(error: dict[str, Any]) -> str:
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return "unknown key (check its spelling and the model's fields)"
    if error["type"] == "missing":
        return "required key is missing"
    if error["type"] == "union_tag_invalid":
        return f"expected one of {error['ctx']['expected_tags']} (found: {error['ctx']['tag']!r})"
    found = error.get("input")
    if found is None or isinstance(found, dict | list):
        return msg
    return f"{msg} (found: {found!r})"


def problems_from_validation(
    exc: ValidationError, file: str, marks: dict[Loc, yaml.Mark] | None = None
) -> list[Problem]:
    """Turn a pydantic ValidationError into located problems."""
    marks = marks or {}
    problems = []
    for error in exc.errors():
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, SpecError):  # problems of another file (a pipeline's included spec), located there
            problems.extend(cause.problems)
            continue
        if isinstance(cause, FieldErrors):
            for rel_loc, message in cause.problems:
                loc = _user_loc((*error["loc"], *rel_loc), marks)
                problems.append(Problem(file, *_locate(loc, marks), _format_path(loc), message))
            continue
        loc = tuple(error["loc"])
        if error["type"] in ("union_tag_invalid", "union_tag_not_found"):  # point at the tag key itself
            loc = (*loc, str(error["ctx"]["discriminator"]).strip("'\""))
        loc = _user_loc(loc, marks)
        line, col = _locate(loc, marks)
        problems.append(Problem(file, line, col, _format_path(loc), _describe(error)))
    return problems


def read_yaml(path: str | Path) -> tuple[Any, dict[Loc, yaml.Mark]]:
    """Parse one YAML file into plain data plus a map from key path to source mark."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([Problem(file, 0, 0, "", "no such file")]) from None
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise SpecError([Problem(file, 0, 0, "", f"cannot read as a YAML text file: {exc}")]) from None
    try:
        root = yaml.compose(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        raise SpecError([Problem(file, line, col, "", f"invalid YAML: {exc.problem or exc}")]) from None
    if root is None:
        raise SpecError([Problem(file, 0, 0, "", "the file is empty; expected a mapping of keys")])
    problems: list[Problem] = []
    _check_duplicates(root, (), file, problems)
    if problems:
        raise SpecError(problems)
    data = yaml.safe_load(text)
    marks: dict[Loc, yaml.Mark] = {(): root.start_mark}
    _index_marks(root, (), marks)
    if not isinstance(data, dict):
        raise SpecError([Problem(file, 1, 1, "", f"expected a mapping of keys, found {type(data).__name__}")])
    return data, marks


def validate_data(model: type[ModelT], data: Any, file: str, marks: dict[Loc, yaml.Mark]) -> ModelT:
    """Validate already-parsed data, raising SpecError with located problems."""
    try:
        return model.model_validate(data, context={"base_dir": os.path.dirname(os.path.abspath(file))})
    except ValidationError as exc:
        raise SpecError(problems_from_validation(exc, file, marks)) from None


def load_spec(model: type[ModelT], path: str | Path) -> ModelT:
    """Load and validate one YAML file as `model`; raises SpecError listing every problem."""
    data, marks = read_yaml(path)
    return validate_data(model, data, str(path), marks)


# --- Field types and blocks shared by every job spec -------------------------------


def _expand(value: str) -> str:
    """Expand ``~``, environment variables, and ``${RETORT_HOME}`` even when it is unset."""
    value = value.replace("${RETORT_HOME}", str(run_home())).replace("$RETORT_HOME", str(run_home()))
    return os.path.expanduser(os.path.expandvars(value))


def resolve_path(value: str, base_dir: str | None) -> str:
    """A path as a spec means it: variables expanded, relative to the YAML file's directory (`base_dir`)."""
    value = _expand(value)
    if base_dir is None or "://" in value or os.path.isabs(value):
        return value
    return os.path.normpath(os.path.join(base_dir, value))


def _resolve_local_path(value: str, info: ValidationInfo) -> str:
    """Relative paths in a spec mean "relative to the YAML file", not to the shell's cwd."""
    return resolve_path(value, (info.context or {}).get("base_dir"))


def _resolve_model_ref(value: str, info: ValidationInfo) -> str:
    """A model is a local checkpoint or a hub id ("org/name"); only the former is resolved."""
    base = (info.context or {}).get("base_dir")
    explicit = value.startswith(("./", "../", "~", "$"))
    value = _expand(value)
    if base is None or "://" in value or os.path.isabs(value):
        return value
    candidate = os.path.normpath(os.path.join(base, value))
    return candidate if explicit or os.path.exists(candidate) else value


PathRef = Annotated[str, StringConstraints(min_length=1), AfterValidator(_resolve_local_path)]
"""A file or directory: a local path (relative to the spec file) or an fsspec URL."""


def _one_or_more(one: str, many: str) -> Callable[[Any], Any]:
    """A before-validator that takes one string for a list of one."""

    def listify(value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return value
        raise ValueError(f"expected {one} or a list of {many}")

    return listify


PathRefs = Annotated[list[PathRef], BeforeValidator(_one_or_more("a file path", "file paths")), Field(min_length=1)]
"""One file or a non-empty list of them (always a list once validated)."""

ModelRef = Annotated[str, StringConstraints(min_length=1), AfterValidator(_resolve_model_ref)]
"""A transformers checkpoint: a local directory (relative to the spec file) or a hub id."""

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
"""A short identifier: letters, digits, '_', '.', '-'; used in paths and job names."""


class Resources(StrictModel):
    """What one job needs from the cluster; the controller schedules by these. `cpus`, `gpus` and `memory_gb`
    are per trainer rank: a job with `workers: 4, gpus: 8` reserves 32 GPUs, one bundle of 8 per rank."""

    cpus: float = Field(1.0, gt=0, description="CPU cores reserved for each trainer rank.")
    gpus: float = Field(0.0, ge=0, description="GPUs reserved for each trainer rank (fractions allowed).")
    memory_gb: float | None = Field(None, gt=0, description="Memory reserved per trainer rank, in GiB; none means "
                                    "no reservation.")
    workers: int = Field(1, ge=1, description="Trainer ranks: FSDP2 processes that shard the model (nccl on GPUs, "
                         "gloo on CPUs), one placement-group bundle each. 1 is one plain process.")


WeightSync = Literal["inprocess", "path", "broadcast"]


class RolloutSettings(StrictModel):
    """Where generation runs: a vLLM engine in the trainer's own process (the default), or rollout workers, Ray
    actors that each own a vLLM engine and the rollout service with its WAL."""

    weight_sync: WeightSync = Field(
        "inprocess", description="How new weights reach the engines: inprocess (one engine in the trainer's "
        "process, tensors handed over directly), path (rollout workers reload safetensors the trainer writes to "
        "the run directory: any node, any tensor_parallel), broadcast (rollout workers receive every tensor over "
        "vLLM's weight-transfer API: nccl on GPUs, gloo on CPUs).")
    engines: int = Field(1, ge=1, description="Rollout workers; each batch is split between them. inprocess "
                         "has exactly one.")
    tensor_parallel: int = Field(1, ge=1, description="Ranks each engine shards its model over (vLLM's "
                                 "tensor_parallel_size), all on one node; more than 1 needs rollout workers.")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="Share of each GPU an engine takes for "
                                          "weights and KV cache (vLLM's gpu_memory_utilization).")
    cpus_per_rank: float = Field(1.0, gt=0, description="CPU cores reserved for each engine rank.")
    gpus_per_rank: float = Field(0.0, ge=0, description="GPUs reserved for each engine rank (0 on a CPU cluster).")

    @model_validator(mode="after")
    def _workers_for_more_than_one(self) -> RolloutSettings:
        if self.weight_sync == "inprocess":
            problems = []
            if self.engines != 1:
                problems.append((("engines",), f"engines is {self.engines} but weight_sync inprocess keeps one "
                                 "engine in the trainer's process; set weight_sync: path or broadcast for "
                                 "rollout workers"))
            if self.tensor_parallel != 1:
                problems.append((("tensor_parallel",), f"tensor_parallel {self.tensor_parallel} needs rollout "
                                 "workers; set weight_sync: path or broadcast"))
            if problems:
                raise FieldErrors(problems)
        return self

    @property
    def workers(self) -> bool:
        """Whether generation runs in rollout workers (Ray actors) rather than in the trainer's process."""
        return self.weight_sync != "inprocess"

    def bundles(self) -> list[dict[str, float]]:
        """One placement-group bundle per rollout worker (none in-process)."""
        bundle = engine_bundle(self.tensor_parallel, self.cpus_per_rank, self.gpus_per_rank)
        return [bundle] * self.engines if self.workers else []


def ranks_problem(resources: Resources, rollout: RolloutSettings) -> tuple[tuple, str] | None:
    """(field, message) when a job's trainer ranks and its engine cannot go together: several ranks need the
    engine in rollout workers (an in-process vLLM engine claims its process's torch.distributed group, and
    each rank would hold only a shard of the weights to push)."""
    if resources.workers > 1 and not rollout.workers:
        return (("resources", "workers"),
                f"resources.workers {resources.workers} runs several trainer ranks, which generate through "
                "rollout workers: set rollout.weight_sync: path or broadcast")
    return None


def engine_bundle(tensor_parallel: int, cpus_per_rank: float, gpus_per_rank: float) -> dict[str, float]:
    """One engine's placement-group bundle: all of its ranks' resources, so they land on one node."""
    bundle = {"CPU": cpus_per_rank * tensor_parallel}
    if gpus_per_rank:
        bundle["GPU"] = gpus_per_rank * tensor_parallel
    return bundle


ROLLOUT = ("Where generation runs: in this process (default: weight_sync inprocess) or in rollout workers (Ray "
           "actors with their own vLLM engines, tensor_parallel ranks each, placed beside the job).")


Tracker = Literal["none", "tensorboard", "wandb", "mlflow"]


def _no_none_beside_others(value: list[str]) -> list[str]:
    if "none" in value and len(value) > 1:
        raise ValueError(f"report_to {value}: 'none' means no tracker; drop it or the others")
    return value


ReportTo = Annotated[list[Tracker], BeforeValidator(_one_or_more("a tracker name", "them")),
                     AfterValidator(_no_none_beside_others)]
REPORT_TO = ("Trackers that get the job's metrics too, under the job store's names (which stays the source of "
             "truth): none, tensorboard (event files in the run directory's tensorboard/), wandb (a run in the "
             "run directory's wandb/, offline unless WANDB_MODE is set), mlflow (a file store in mlruns/); one "
             "name or a list.")

Precision = Literal["auto", "bf16", "fp32"]
ENGINE = (
    "vllm (default): the student generates on vLLM, new weights pushed into it every step. hf: on a plain "
    "transformers decoding loop over the trainer's own model (no copy, no push), as TRL generates without vLLM: "
    "faster where vLLM's work per step outweighs the model's, as with a small model on a CPU "
    "(benchmarks/bench_vs_trl.py). Both write every token to the WAL."
)

PRECISION = ("Numeric precision of training and generation alike: bf16 (mixed: fp32 master weights, bf16 compute), "
             "fp32, or auto = bf16 on a CUDA device that supports it, fp32 elsewhere (a CPU without bf16 units "
             "runs bf16 several times slower). Set here so that no library's default decides it.")


def resolve_precision(precision: Precision) -> Literal["bf16", "fp32"]:
    """What `auto` means on this machine; `bf16` and `fp32` are taken as written."""
    if precision != "auto":
        return precision
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


# The dtype name of each resolved precision, as torch (`getattr(torch, name)`), transformers and vLLM all take it.
PRECISION_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def precision_dtype(precision: Precision) -> str:
    """The dtype name `precision` means on this machine ("bfloat16" or "float32")."""
    return PRECISION_DTYPES[resolve_precision(precision)]
