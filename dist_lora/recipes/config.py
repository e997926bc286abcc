"""Fine-tuning recipe configuration: YAML -> typed dataclasses, checked before any process starts.

Every key is known and typed; a wrong one is rejected with its dotted name (``train.lr must be a
float, got 'fast'``), so a typo never reaches a job of many ranks. ``lora`` holds
``dist_lora.LoraConfig`` fields, or ``adalora`` ``dist_lora.AdaLoraConfig`` fields (one of the
two; see :mod:`dist_lora.recipes.adapter`). Overrides use the same dotted names: ``train.steps=20``.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dist_lora.config.lora import LoraConfig
from dist_lora.models.spec import spec_from_config
from dist_lora.recipes.adapter import adapter_config, check
from dist_lora.recipes.data.formats import FORMATS


@dataclass
class ModelSection:
    hf_dir: typing.Optional[str] = None  # a Hugging Face model directory, or
    demo_config: typing.Optional[str] = None  # an HF config.json built with random weights (demo)
    demo_seed: int = 0
    quantize: typing.Optional[str] = None  # nf4 | fp4: 4-bit base weights (QLoRA), adapters stay in train.dtype
    quantize_blocksize: int = 64


@dataclass
class ParallelSection:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False
    # Layers of the first / last pipeline stage (the others split the rest evenly); null: every
    # stage the same when pipeline_parallel divides the layers, else balanced automatically.
    first_stage_layers: typing.Optional[int] = None
    last_stage_layers: typing.Optional[int] = None


@dataclass
class DataSection:
    path: str = "data/demo.txt"
    format: str = "text"  # text | jsonl | chat | completion (dist_lora/recipes/data/formats.py)
    text_field: str = "text"  # jsonl: the field holding the text
    seq_len: int = 64  # positions per sample (the most; chat / completion samples are padded or packed)
    packing: bool = False  # chat / completion: pack whole documents per sample, attention kept inside each
    truncate: bool = False  # a document longer than seq_len + 1 tokens: cut to that (true) or refused (false)
    eval_path: typing.Optional[str] = None  # validation data in the same format (else a held-out tail of path)
    cache_dir: typing.Optional[str] = None  # the token cache's folder (default: .dist_lora_cache beside the data)
    tokenizer: str = "auto"  # auto (the model directory's, else bytes) | bytes
    holdout_sequences: int = 2  # samples held out when there is no eval_path; rows of the peft verification


@dataclass
class TrainSection:
    steps: int = 100
    micro_batch_size: int = 4
    micro_batches: int = 1  # gradient accumulation (pipeline micro-batches with PP)
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    dtype: str = "float32"  # float32 | bfloat16
    seed: int = 1234
    log_every: int = 1
    eval_every: int = 0  # validation loss every N steps (0: before and after training only)
    stop_at: typing.Optional[int] = None  # end this run after this step (checkpointed), e.g. for a time limit


@dataclass
class CheckpointSection:
    dir: str = "runs/demo/checkpoints"
    every: int = 50


@dataclass
class OutputSection:
    dir: str = "runs/demo"
    verify: bool = True
    verify_tolerance: float = 1e-4
    answer_prompts: int = 0  # held-out prompts answered by the base and the fine-tuned model (exact match)
    max_new_tokens: int = 32  # the length limit of those answers


@dataclass
class DeepSpeedSection:
    config: typing.Optional[str] = None  # a ZeRO JSON (configs/deepspeed/); used by launch/finetune_deepspeed.py


@dataclass
class FinetuneConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    lora: dict = field(default_factory=dict)
    adalora: dict = field(default_factory=dict)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    output: OutputSection = field(default_factory=OutputSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)

    def lora_config(self) -> LoraConfig:
        """The adapter's config: ``LoraConfig`` of ``lora``, or ``AdaLoraConfig`` of ``adalora``."""
        return adapter_config(self)


def _check_type(name: str, value, annotation):
    hints = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Union else (annotation,)
    for hint in hints:
        if hint is type(None) and value is None:
            return value
        if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if hint in (int, str, bool, dict) and type(value) is hint:
            return value
    wanted = " or ".join("null" if h is type(None) else h.__name__ for h in hints)
    raise ValueError(f"config key {name} must be {wanted}, got {value!r}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix or 'top level'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key {prefix}{unknown[0]}; known keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{prefix}{key}.")
        elif hint is dict and value is None:  # "lora: null" (e.g. an override) drops the section
            kwargs[key] = {}
        else:
            kwargs[key] = _check_type(f"{prefix}{key}", value, hint)
    return cls(**kwargs)


def _apply_override(data: dict, override: str) -> None:
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like section.key=value")
    dotted, raw = override.split("=", 1)
    *sections, key = dotted.split(".")
    node = data
    for section in sections:
        node = node.setdefault(section, {})
    node[key] = yaml.safe_load(raw)


def load_config(path: str | Path, overrides: list[str] = ()) -> FinetuneConfig:
    """Read, override and validate a recipe; ``ValueError`` names the first bad key."""
    text = Path(path).read_text()
    data = yaml.safe_load(text) or {}
    for override in overrides:
        _apply_override(data, override)
    config = _build(FinetuneConfig, data, "")
    if (config.model.hf_dir is None) == (config.model.demo_config is None):
        raise ValueError("config needs exactly one of model.hf_dir and model.demo_config")
    if config.data.format not in FORMATS:
        raise ValueError(f"data.format must be one of {', '.join(FORMATS)}, got {config.data.format!r}")
    if FORMATS[config.data.format].stream and (config.data.packing or config.output.answer_prompts):
        key = "data.packing" if config.data.packing else "output.answer_prompts"
        raise ValueError(f"{key} needs data.format chat or completion (documents with prompts and answers); "
                         f"{config.data.format} data is one token stream cut into windows")
    if config.data.tokenizer not in ("auto", "bytes"):
        raise ValueError(f"data.tokenizer must be auto or bytes, got {config.data.tokenizer!r}")
    if config.train.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"train.dtype must be float32 or bfloat16, got {config.train.dtype!r}")
    if config.model.quantize not in (None, "nf4", "fp4"):
        raise ValueError(f"model.quantize must be nf4, fp4 or null, got {config.model.quantize!r}")
    for name in ("steps", "micro_batch_size", "micro_batches", "log_every"):
        if getattr(config.train, name) < 1:
            raise ValueError(f"train.{name} must be >= 1")
    if config.train.eval_every < 0 or config.data.seq_len < 1:
        raise ValueError("train.eval_every must be >= 0 and data.seq_len >= 1")
    _check_layout(config)
    check(config, runner=None)
    return config


def _check_layout(config: FinetuneConfig) -> None:
    """The parallel layout against the model's config.json, when it can be read here (a missing
    model directory is reported by the job itself, on every rank)."""
    m, p = config.model, config.parallel
    source = Path(m.demo_config) if m.demo_config is not None else Path(m.hf_dir) / "config.json"
    if not source.is_file():
        return
    try:
        spec = spec_from_config(json.loads(source.read_text()))
        spec.with_pipeline(p.first_stage_layers, p.last_stage_layers).check_layout(p.tensor_parallel,
                                                                                   p.pipeline_parallel)
    except ValueError as err:
        raise ValueError(f"parallel section does not fit {source}: {err}") from err
