"""Typed, validated run configuration.

A run is described by one YAML file with the sections ``model``, ``data``,
``train`` and ``parallel``. :func:`load_config` reads it (with ``yaml.safe_load``),
applies ``section.key=value`` overrides, checks every key and type and the
combinations that cannot work, and returns a :class:`Config`. Every problem is
reported as one :class:`ConfigError` naming the key, the value and what was
expected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

# the model section is the model package's own (liquid_dist.model.config); re-exported here
from liquid_dist.model.config import (  # noqa: F401
    ABLATIONS,
    ARCHITECTURE_REVISIONS,
    RUN_SETTINGS,
    ConfigError,
    ModelConfig,
    MoEConfig,
    architecture,
    build_dataclass,
    check_positive,
    check_same_architecture,
    flatten_keys,
    model_config_from_dict,
    next_power_of_two,
    validate_model,
)


@dataclass
class DataConfig:
    """Where the tokens come from and how they become batches."""

    tokenizer: str = "data/tokenizer/tokenizer.model"
    train_shards: Union[str, list] = "data/shards"
    """A directory with manifest.json, a brace pattern, or a list of either."""
    val_shards: Union[str, list, None] = None
    val_sources: dict = field(default_factory=dict)
    """Validation per source: {name: shard spec}, each evaluated on its own at every
    evaluation (``sources`` in the eval record), besides ``val_shards``."""
    sources: list = field(default_factory=list)
    """Optional list of {name, shards, weight, manifest, max_repetition}; overrides
    ``train_shards``."""
    stages: list = field(default_factory=list)
    """Staged mixture: [{start_step, weights: {source name: weight >= 0}}], the first at
    step 0; a source a stage does not name has weight 0 in it. Replaces the sources'
    ``weight`` (docs/data.md, "Staged mixtures")."""
    max_repetition: Optional[float] = 4.0
    """The most epochs of a training source a run may read (a source's own
    ``max_repetition`` wins; null: no limit): a longer run is a ConfigError before it
    starts (liquid_dist.data.mixture)."""
    objective: Literal["span_corruption", "prefix_lm", "mixture"] = "span_corruption"
    objective_weights: dict = field(
        default_factory=lambda: {"span_corruption": 0.5, "prefix_lm": 0.5}
    )
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    encoder_length: int = 128
    decoder_length: int = 128
    num_workers: int = 0
    shuffle_buffer: int = 1000
    """Documents in each virtual stream's seeded shuffle buffer (0: none); a rank holds
    micro_batch_size x grad_accum streams (docs/data.md)."""
    bad_sample_policy: Literal["fail", "skip"] = "skip"
    """``skip``: count and report bad samples/shards; ``fail``: raise naming the shard."""
    batches_per_epoch: int = 0
    """Global steps per epoch (the same for every world size); 0 derives it from the
    shard manifests."""
    worker_timeout_s: float = 300.0
    """A loader worker that delivers no batch for this long raises instead of hanging."""


@dataclass
class WandbConfig:
    mode: Literal["disabled", "offline", "online"] = "disabled"
    project: str = "liquid_dist"
    name: Union[str, None] = None


@dataclass
class SpikeConfig:
    """Loss spikes (liquid_dist.train.spikes; docs/training.md, "Loss spikes")."""

    policy: Literal["off", "skip", "rewind"] = "skip"
    """``skip``: an outlier step's update is not applied; ``rewind``: also, after
    ``rewind_after`` outliers in a row, reload the last checkpoint before the spike and
    go on past the spike's batches."""
    window: int = 128
    """The running window of applied steps the outliers are judged against (the first
    ``window // 2`` steps judge nothing)."""
    sigma: float = 6.0
    """An outlier: loss or gradient norm above the window's mean + sigma x its std."""
    rewind_after: int = 4


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    max_steps: int = 100
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """``auto``: bf16 on GPU, fp32 on CPU."""
    log_every: int = 10
    ckpt_every: int = 100
    keep_last: int = 2
    async_checkpoint: bool = False
    """Write checkpoints in the background: the loop waits only while each rank's share is
    serialised into host memory (a buffer as large as that share, kept for the run)."""
    eval_every: int = 100
    eval_steps: int = 10
    monitor_every: int = 0
    """Per-block activation RMS / gradient norms every N steps (0: off)."""
    max_nan_skips: int = 5
    max_restarts_without_progress: int = 3
    """Under slurm/pretrain.sh: crashed attempts requeued in a row without a checkpoint
    newer than the one they restarted from; the next crash ends the job with status 4
    (liquid_dist.train.requeue)."""
    hang_detection: bool = True
    """Every rank beats a heartbeat and local rank 0 of each node runs a watchdog that stops
    the job when a rank is frozen or makes no progress (liquid_dist.train.watchdog), under
    any launcher. Off for a run held in a debugger."""
    hang_liveness_s: float = 30.0
    """A rank whose heartbeat (a thread, beating every second) is silent this long is
    frozen, in every section."""
    hang_timeout_s: Union[float, None] = None
    """A rank without a finished training step for this long is hung and the job is stopped
    (and requeued under Slurm). None: ten times the slowest of the first training steps, at
    least 60 s (the long allowance until they are measured)."""
    hang_timeout_long_s: float = 1800.0
    """The same for the sections that may take long: start-up (build, checkpoint load),
    the first step, evaluation, checkpoint save, a rewind."""
    compile: bool = False
    """Compile every ImprovedTransformerBlock with ``torch.compile(fullgraph=True)``."""
    seed: int = 1234
    deterministic: bool = False
    """Deterministic algorithms only (``torch.use_deterministic_algorithms``; on GPU also
    cuBLAS's fixed workspace and no cuDNN autotuning): a GPU run replays the same bits
    on a requeue or a rewind. CPU runs are bitwise repeatable without it
    (docs/training.md, "Bitwise with any number of threads")."""
    init_from: Union[str, None] = None
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ParallelConfig:
    zero_stage: int = 3
    ep_size: int = 1


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_stages(d: DataConfig) -> None:
    if not d.stages:
        return
    if not d.sources:
        raise ConfigError("data.stages", d.stages, "data.sources to mix (stages weigh sources)")
    names = [s.get("name", f"source{i}") for i, s in enumerate(d.sources)]  # as the loader's
    weighted = [i for i, s in enumerate(d.sources) if "weight" in s]
    if weighted:
        raise ConfigError(f"data.sources[{weighted[0]}].weight", d.sources[weighted[0]]["weight"],
                          "no weight: with data.stages the stages give the weights")
    previous = -1
    for k, stage in enumerate(d.stages):
        key = f"data.stages[{k}]"
        if not isinstance(stage, dict) or set(stage) != {"start_step", "weights"}:
            raise ConfigError(key, stage, "a mapping with 'start_step' and 'weights'")
        start, weights = stage["start_step"], stage["weights"]
        if not isinstance(start, int) or isinstance(start, bool) or start <= previous or (
                k == 0 and start != 0):
            raise ConfigError(f"{key}.start_step", start,
                              "0 for the first stage, then steps in increasing order")
        previous = start
        if not isinstance(weights, dict) or not weights:
            raise ConfigError(f"{key}.weights", weights, "a mapping from source names to weights")
        for name, w in weights.items():
            if name not in names:
                raise ConfigError(f"{key}.weights.{name}", w, f"a weight of a source ({names})")
            if not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0:
                raise ConfigError(f"{key}.weights.{name}", w, "a weight >= 0")
        if not any(w > 0 for w in weights.values()):
            raise ConfigError(f"{key}.weights", weights, "at least one positive weight")


def _check_repetition(key: str, value: Any) -> None:
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                              or value <= 0):
        raise ConfigError(key, value, "a positive number of epochs, or null for no limit")


def validate(cfg: Config) -> None:
    """Raise ConfigError for the first combination that cannot work."""
    validate_model(cfg.model)
    d, m, t, par = cfg.data, cfg.model, cfg.train, cfg.parallel
    if d.encoder_length > m.max_encoder_length:
        raise ConfigError("data.encoder_length", d.encoder_length,
                          f"<= model.max_encoder_length ({m.max_encoder_length})")
    if d.decoder_length > m.max_decoder_length:
        raise ConfigError("data.decoder_length", d.decoder_length,
                          f"<= model.max_decoder_length ({m.max_decoder_length})")
    for name in ("encoder_length", "decoder_length"):
        if getattr(d, name) < 2:
            raise ConfigError(f"data.{name}", getattr(d, name), "an integer >= 2")
    if d.num_workers < 0:
        raise ConfigError("data.num_workers", d.num_workers, "an integer >= 0")
    if d.shuffle_buffer < 0:
        raise ConfigError("data.shuffle_buffer", d.shuffle_buffer, "an integer >= 0")
    if not 0.0 < d.noise_density < 1.0:
        raise ConfigError("data.noise_density", d.noise_density, "a fraction in (0, 1)")
    if d.mean_noise_span_length < 1.0:
        raise ConfigError("data.mean_noise_span_length", d.mean_noise_span_length, "a value >= 1")
    if d.objective == "mixture":
        allowed = {"span_corruption", "prefix_lm"}
        bad = set(d.objective_weights) - allowed
        if bad or not d.objective_weights:
            raise ConfigError("data.objective_weights", d.objective_weights,
                              f"a mapping from {sorted(allowed)} to positive weights")
        for k, w in d.objective_weights.items():
            if not isinstance(w, (int, float)) or isinstance(w, bool) or w <= 0:
                raise ConfigError(f"data.objective_weights.{k}", w, "a positive number")
    if d.batches_per_epoch < 0:
        raise ConfigError("data.batches_per_epoch", d.batches_per_epoch,
                          "an integer >= 0 (0: derived from the manifests)")
    check_positive("data.worker_timeout_s", d.worker_timeout_s)
    # the room span corruption needs in the decoder depends on the tokenizer's sentinels:
    # liquid_dist.data.stream_spec checks it (in the run plan, before any process group)
    if d.objective in ("span_corruption", "mixture") and d.encoder_length < 3:
        raise ConfigError("data.encoder_length", d.encoder_length,
                          ">= 3 for span corruption (a token, a sentinel and EOS)")
    for i, s in enumerate(d.sources):
        if not isinstance(s, dict) or not {"shards"} <= set(s) <= {
                "name", "shards", "weight", "manifest", "max_repetition"}:
            raise ConfigError(f"data.sources[{i}]", s,
                              "a mapping with 'shards' and optional 'name', 'weight', "
                              "'manifest', 'max_repetition'")
        w = s.get("weight", 1.0)
        if not isinstance(w, (int, float)) or isinstance(w, bool) or w <= 0:
            raise ConfigError(f"data.sources[{i}].weight", w, "a positive number")
        _check_repetition(f"data.sources[{i}].max_repetition", s.get("max_repetition"))
    _check_repetition("data.max_repetition", d.max_repetition)
    _check_stages(d)
    if not isinstance(d.val_sources, dict):
        raise ConfigError("data.val_sources", d.val_sources, "a mapping from names to shard specs")
    for name, spec in d.val_sources.items():
        if not isinstance(name, str) or not name or not isinstance(spec, (str, list)) or not spec:
            raise ConfigError(f"data.val_sources.{name}", spec,
                              "a shard spec (a directory, a pattern or a list) under a name")
    for name in ("max_steps", "micro_batch_size", "grad_accum", "log_every", "ckpt_every",
                 "keep_last", "eval_every", "eval_steps"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name}", getattr(t, name), "an integer >= 1")
    for name in ("warmup_steps", "monitor_every", "max_nan_skips",
                 "max_restarts_without_progress"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name}", getattr(t, name), "an integer >= 0")
    check_positive("train.lr", t.lr)
    if t.hang_timeout_s is not None:
        check_positive("train.hang_timeout_s", t.hang_timeout_s)
    check_positive("train.hang_timeout_long_s", t.hang_timeout_long_s)
    check_positive("train.hang_liveness_s", t.hang_liveness_s)
    if t.spike.window < 4:
        raise ConfigError("train.spike.window", t.spike.window, "an integer >= 4")
    check_positive("train.spike.sigma", t.spike.sigma)
    if t.spike.rewind_after < 1:
        raise ConfigError("train.spike.rewind_after", t.spike.rewind_after, "an integer >= 1")
    if not 0 <= t.min_lr <= t.lr:
        raise ConfigError("train.min_lr", t.min_lr, f"a value in [0, train.lr={t.lr}]")
    if t.grad_clip < 0:
        raise ConfigError("train.grad_clip", t.grad_clip, "a value >= 0 (0 disables clipping)")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(t, name) < 1.0:
            raise ConfigError(f"train.{name}", getattr(t, name), "a value in [0, 1)")
    if par.zero_stage not in (0, 1, 2, 3):
        raise ConfigError("parallel.zero_stage", par.zero_stage, "one of 0, 1, 2, 3")
    if par.ep_size < 1:
        raise ConfigError("parallel.ep_size", par.ep_size, "an integer >= 1")
    if par.ep_size > 1 and not m.keeps("moe"):
        raise ConfigError("parallel.ep_size", par.ep_size,
                          "1: model.ablate removes the MoE layers, there are no experts to place")
    if m.moe.num_experts % par.ep_size:
        raise ConfigError("parallel.ep_size", par.ep_size,
                          f"a divisor of model.moe.num_experts ({m.moe.num_experts})")
    if par.ep_size > 1 and par.zero_stage != 3:
        raise ConfigError("parallel.ep_size", par.ep_size,
                          "1 unless parallel.zero_stage is 3 (expert parallelism is "
                          "implemented for ZeRO-3; docs/parallelism.md)")
    if par.ep_size > 1 and t.compile:
        raise ConfigError("train.compile", t.compile,
                          "false with parallel.ep_size > 1: the expert exchange reads "
                          "its split sizes on the host and runs collectives, which a "
                          "fullgraph-compiled block cannot hold (docs/training.md)")


# ------------------------------------------------------------- loading


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(item, item, "an override of the form section.key=value")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(key, raw, "a dotted key such as model.d_model")
    return path, yaml.safe_load(raw) if raw.strip() else ""


def _apply_override(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(path[: i + 1]), child, "a mapping to override into")
        node = child
    node[path[-1]] = value


def config_from_dict(tree: dict, overrides: Iterable[str] = ()) -> Config:
    """Build and validate a Config from a nested mapping plus overrides."""
    tree = _deepcopy(tree)
    for item in overrides:
        path, value = _parse_override(item)
        _apply_override(tree, path, value)
    cfg = build_dataclass(Config, tree, "")
    validate(cfg)
    return cfg


def _deepcopy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _deepcopy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_deepcopy(v) for v in tree]
    return tree


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config, apply ``section.key=value`` overrides, validate.

    Raises ConfigError (with the file name) for unknown keys, wrong types and
    impossible combinations; FileNotFoundError if ``path`` does not exist.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        try:
            tree = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(str(path), "<unparsable>", f"valid YAML ({exc})") from exc
    if not isinstance(tree, dict):
        raise ConfigError(str(path), tree, "a mapping with sections model, data, train, parallel")
    return config_from_dict(tree, overrides)

