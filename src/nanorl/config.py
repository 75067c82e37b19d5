"""The run configuration: one dataclass tree, resolved in one order, validated in one place.

    defaults -> preset (`tiny`, or the depth rule) -> TOML recipe (--config) -> key=value overrides -> derived
    fields -> validation

Overrides name a field by `section.field` (`model.depth=12`, `rl.group_size=16`) or, without a dot, by its
bare name: a bare name sets that field in every section that has it (`steps=5` shortens every stage,
`depth=12` is `model.depth=12`). Values are parsed to the field's type; a bad key or value is a `NanorlError`
naming it, with exit code 2.

The depth rule (nanochat's): a depth-d model has d layers, width 64·d rounded up to a multiple of the head
dimension 128, and heads of dimension 128 (n_head = width / 128): depth 8 -> 512 wide with 4 heads, depth 20 ->
1280 wide with 10 heads; an odd depth rounds up, depth 5 -> 384 wide with 3 heads (64·5 = 320 has no whole
number of 128-wide heads). Fields left at 0 follow the rule; any of them can be set explicitly instead (an
explicit width with n_head left at 0 gets ceil(width / 128) heads, or, when those do not divide it, the head
count whose head dimension is nearest 128).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_origin, get_type_hints

from nanorl.api import NanorlError
from nanorl.tokenizer import MIN_VOCAB_SIZE  # light: tiktoken and rustbpe load inside its functions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _f(default, help: str, **rules):
    """A config field with its help text and validation rules (gt, ge, le, choices)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **rules})
    return field(default=default, metadata={"help": help, **rules})


@dataclass
class ModelConfig:
    depth: int = _f(8, "number of transformer layers; width and heads follow from it (the depth rule)", ge=1, le=64)
    n_embd: int = _f(0, "model width (0: 64 x depth, rounded up to a multiple of 128)", ge=0)
    n_head: int = _f(0, "query heads (0: width / 128, rounded up; heads of 128 under the depth rule)", ge=0)
    n_kv_head: int = _f(0, "key/value heads for grouped-query attention (0: n_head)", ge=0)
    vocab_size: int = _f(
        65536,
        f"tokenizer and embedding vocabulary size (at least {MIN_VOCAB_SIZE}: 256 byte tokens and the special tokens)",
        ge=MIN_VOCAB_SIZE,
    )
    seq_len: int = _f(2048, "context length in tokens", ge=8)
    softcap: float = _f(15.0, "logit soft-capping: logits = c * tanh(logits / c) (0: off)", ge=0)
    attention: str = _f(
        "auto", "attention backend (auto: triton on CUDA, sdpa elsewhere)", choices=("auto", "triton", "sdpa", "eager")
    )


@dataclass
class OptimConfig:
    matrix_lr: float = _f(0.02, "Muon learning rate for the transformer's matrices", gt=0)
    embedding_lr: float = _f(0.2, "AdamW learning rate for the input embedding", gt=0)
    unembedding_lr: float = _f(0.004, "AdamW learning rate for the output head", gt=0)
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0)
    adam_beta1: float = _f(0.8, "AdamW beta1", ge=0, lt=1)
    adam_beta2: float = _f(0.95, "AdamW beta2", ge=0, lt=1)
    muon_momentum: float = _f(0.95, "Muon momentum", ge=0, lt=1)
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)", ge=0)


@dataclass
class DataConfig:
    corpus: str = _f("task", "pretraining text: 'task' (the task's own corpus), 'fineweb', or a path/glob")
    fineweb_shards: int = _f(
        8,
        "when corpus = fineweb: the first N FineWeb-EDU shards are downloaded (where missing) before the tokenizer"
        " trains; the corpus is every shard downloaded (0: download nothing)",
        ge=0,
    )
    data_dir: str = _f("", "where the task's data files live ('' : the task's default source)")
    skip_bad: bool = _f(False, "skip (and count) unreadable lines and corrupt shards instead of stopping")
    chat: str = _f("", "extra chat data for midtraining: a .jsonl of {\"messages\": [...]} ('' : none)")


@dataclass
class TokenizerConfig:
    train_chars: int = _f(2_000_000_000, "characters of the corpus to train the BPE on (at most)", ge=1000)
    max_digits: int = _f(3, "longest digit run in one token (GPT-4: 3; 1: a token per digit)", ge=1, le=9)


@dataclass
class TrainConfig:
    """A supervised stage: base (pretraining), mid (chat format) or sft (task rationales)."""

    steps: int = _f(-1, "optimizer steps (-1: follow the stage's budget rule)", ge=-1)
    device_batch_size: int = _f(
        0, "the most rows per forward pass on one device (0: 8 on the CPU, what fits on a GPU)", ge=0
    )
    total_batch_tokens: int = _f(
        0, "tokens per optimizer step, whatever the ranks, reached by gradient accumulation (0: one pass a rank)", ge=0
    )
    lr: float = _f(1.0, "multiplier on the optim section's learning rates", gt=0)
    warmup_ratio: float = _f(0.0, "fraction of steps of linear warmup", ge=0, le=1)
    warmdown_ratio: float = _f(0.2, "fraction of steps of linear decay to final_lr_frac at the end", ge=0, le=1)
    final_lr_frac: float = _f(0.0, "learning rate at the end, as a fraction of the peak", ge=0, le=1)
    eval_every: int = _f(250, "steps between validation evaluations (0: only at the end)", ge=0)
    checkpoint_every: int = _f(500, "steps between checkpoints (0: only at the end)", ge=0)
    tokens_per_param: float = _f(
        20.0, "base only, when steps = -1: train on this many tokens per parameter (Chinchilla's 20)", gt=0
    )


def _stage(**overrides) -> Any:
    return field(default_factory=lambda: TrainConfig(**overrides))


@dataclass
class RLConfig:
    steps: int = _f(
        -1,
        "GRPO steps (-1: as many as the train split has batches of prompts_per_step, one pass over it; with"
        " dynamic_sampling a step may sample several batches)",
        ge=-1,
    )
    prompts_per_step: int = _f(8, "prompts per step", ge=1)
    group_size: int = _f(8, "completions sampled per prompt (G)", ge=2)
    max_new_tokens: int = _f(256, "completion length limit in tokens (longer ones are truncated and masked)", ge=1)
    temperature: float = _f(1.0, "sampling temperature", gt=0)
    top_k: int = _f(0, "sample from the k most likely tokens (0: all)", ge=0)
    lr: float = _f(0.05, "multiplier on the optim section's learning rates", gt=0)
    matrix_lr_scale: float = _f(
        1.0,
        "a further multiplier on Muon's rate (the block matrices) in RL: its steps have full size however noisy"
        " the gradient",
        gt=0,
    )
    epsilon: float = _f(0.2, "clip range of the importance ratio (matters with ppo_epochs > 1)", gt=0)
    beta: float = _f(0.0, "weight of the KL penalty to the frozen reference model (k3 estimator)", ge=0)
    ppo_epochs: int = _f(1, "optimisation passes over each batch of rollouts", ge=1)
    std_normalize: bool = _f(True, "divide advantages by the group's reward std")
    drop_zero_variance: bool = _f(False, "drop groups whose rewards are all equal (they carry no signal)")
    dynamic_sampling: bool = _f(
        False,
        "sample further batches of prompts_per_step prompts until the step has prompts_per_step groups whose"
        " rewards differ, and learn from those only (DAPO's dynamic sampling; at most max_sample_batches)",
    )
    max_sample_batches: int = _f(4, "prompt batches a step samples at most with dynamic_sampling", ge=1)
    mask_truncated: bool = _f(
        True, "leave completions cut at max_new_tokens out of the loss (False: train on them with their reward)"
    )
    rewards: dict = _f({}, "reward weights by name, e.g. aqua.correct:1,aqua.format:1 ({}: the task's defaults)")
    kl_every: int = _f(10, "steps between letter/sequence KL telemetry (0: never)", ge=0)
    eval_every: int = _f(50, "steps between dev evaluations (0: only at the end)", ge=0)
    checkpoint_every: int = _f(50, "steps between checkpoints (0: only at the end)", ge=0)


@dataclass
class EvalConfig:
    splits: list = _f(["dev"], "splits to evaluate")
    mode: str = _f(
        "generative",
        "generative (sample, extract, score), categorical (answer-letter logits) or both",
        choices=("generative", "categorical", "both"),
    )
    max_examples: int = _f(0, "evaluate at most this many examples per split (0: all)", ge=0)
    max_new_tokens: int = _f(256, "completion length limit", ge=1)
    temperature: float = _f(0.0, "sampling temperature (0: greedy)", ge=0)
    samples: int = _f(
        0,
        "also sample this many completions per question at eval.sample_temperature: the `sampled` mode, whose"
        " accuracy is their mean (pass@1), with pass@k and maj@k (0: off)",
        ge=0,
    )
    sample_temperature: float = _f(1.0, "sampling temperature of the `sampled` mode", gt=0)
    sample_top_k: int = _f(
        0, "top-k of the `sampled` mode (0: all tokens; as rl.top_k to measure the policy RL samples)", ge=0
    )
    batch_size: int = _f(16, "questions per batch", ge=1)


@dataclass
class EngineConfig:
    compile: bool = _f(
        False,
        "compile the decode step of CPU sampling (RL rollouts, eval) with torch.compile: 20-40 s once per process "
        "and batch layout, then ~1.35x the eager tokens/s (bench/generate.py); ignored on a GPU",
    )


@dataclass
class TelemetryConfig:
    console: bool = _f(True, "progress bars and tables on the terminal")
    wandb: bool = _f(
        False, "also log to Weights & Biases (offline, for `wandb sync`, without WANDB_API_KEY or `wandb login`)"
    )
    wandb_project: str = _f("nanorl", "wandb project")
    log_every: int = _f(1, "steps between logged training metrics", ge=1)
    disable: list = _f([], "telemetry hooks (by name) to switch off")
    attn_entropy_every: int = _f(
        100,
        "steps between attention-entropy measurements (per layer, on a few rows of the step's batch), and at every"
        " stage's last step (0: never)",
        ge=0,
    )


@dataclass
class CheckpointConfig:
    store: str = _f("", "also mirror checkpoints to this store, e.g. s3://bucket/prefix ('' : local only)")


@dataclass
class RunConfig:
    name: str = _f("", "run name: the folder under $NANORL_HOME/runs ('' : <task>-<preset or dN>)")
    task: str = _f("arith", "the task (a registered plugin task: `nanorl plugins list`)")
    preset: str = _f("", "the preset applied before the recipe and overrides ('' , tiny, d8, d12, d20, d26)")
    # at most 2^32 - 1: the RL stage seeds torch with (seed * 1_000_003 + step) * 64 + ..., which must fit 64 bits
    seed: int = _f(42, "random seed", ge=0, le=2**32 - 1)
    device: str = _f("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = _f(
        "auto",
        "compute dtype (auto: bfloat16 on CUDA, float32 elsewhere)",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # tokens a step (nanochat's): 2^19 for pretraining and midtraining, 32 rows of 2,048 for SFT, reached by
    # gradient accumulation, so the same recipe trains the same model on one GPU or eight (stages.common)
    base: TrainConfig = _stage(total_batch_tokens=2**19)
    mid: TrainConfig = _stage(warmdown_ratio=0.2, total_batch_tokens=2**19)
    sft: TrainConfig = _stage(lr=0.02, warmdown_ratio=1.0, total_batch_tokens=2**16)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    # derived (filled by resolve(), read-only afterwards)
    @property
    def head_dim(self) -> int:
        return self.model.n_embd // self.model.n_head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = (
    "model", "optim", "data", "tokenizer", "base", "mid", "sft", "rl", "eval", "engine", "telemetry", "checkpoint",
)  # fmt: skip
# The pipeline's steps in order (each writes runs/<name>/<step>/) and those of them that train a model. They live
# here, below the stages and the stores, because both need them (store.runs splits s3://.../RUN/STAGE URLs).
STAGES = ("tokenizer", "base", "mid", "sft", "rl", "eval", "report")
MODEL_STAGES = ("base", "mid", "sft", "rl")

# Presets: what each sets on top of the defaults. Depth presets only pick the depth (the rule does the rest);
# `tiny` is sized for a 2-core CPU and the offline `arith` task.
PRESETS: dict[str, dict[str, Any]] = {
    "d8": {"model.depth": 8},
    "d12": {"model.depth": 12},
    "d20": {"model.depth": 20},
    "d26": {"model.depth": 26},
    # `tiny`: the CPU demo (nanorl pipeline --task arith --preset tiny), budgeted for <= 10 minutes on 2 cores.
    # The arith tokenizer stops below 700 tokens (every word becomes one token), so 1024 rows suffice.
    "tiny": {
        "model.depth": 4,
        "model.n_embd": 128,
        # two heads of 64: the walk and the column lines copy digits from the prompt (an option's last digit, the
        # operands), and whether both copies formed used to depend on the seed: with one head the pipeline reached
        # 60% dev on 3 of 5 seeds; with two heads and wide train options (builtin/arith.py) every seed run has
        # reached 90% (docs/benchmarks.md, seventh session)
        "model.n_head": 2,
        "model.vocab_size": 1024,
        "model.seq_len": 256,
        "tokenizer.train_chars": 5_000_000,
        # a token per digit: the column arithmetic and the option walk copy and compare single digits
        "tokenizer.max_digits": 1,
        # twice nanochat's rates: at width 128 they lowered validation bpb faster (0.287 vs 0.293 at 0.06, 200
        # steps; docs/benchmarks.md); SFT at the full rate (the default 0.02 left the SFT loss flat here)
        "optim.matrix_lr": 0.04,
        "optim.embedding_lr": 0.4,
        "optim.unembedding_lr": 0.008,
        # 1,000 base + 600 SFT steps: two heads train ~12% slower than one on this CPU, and 1,200 + 700 steps with
        # two heads took 622 s; the option copy has formed by base step 1,000, and SFT completes the operand copy
        # on every seed run (bench/copy_probe.py; docs/benchmarks.md)
        "base.steps": 1000,
        # the stages' steps are one pass of device_batch_size rows (8 x 256 tokens: the budget above was tuned
        # at that size; the defaults' 2^19-token steps are for GPUs)
        "base.total_batch_tokens": 0,
        "mid.total_batch_tokens": 0,
        "sft.total_batch_tokens": 0,
        "base.device_batch_size": 8,
        "base.eval_every": 100,
        "base.checkpoint_every": 100,
        "mid.steps": 20,
        "mid.device_batch_size": 8,
        "sft.steps": 600,
        "sft.device_batch_size": 16,
        "sft.lr": 1.0,
        "sft.warmdown_ratio": 0.5,
        "sft.checkpoint_every": 100,
        # RL: 16 prompts a step and only the groups whose rewards differ: with Muon and AdamW every step has
        # full size whatever the gradient's noise, so the batch must carry signal (at 8 prompts and lr x 0.1
        # RL lost 11 points; docs/benchmarks.md)
        # Muon's RL step / 10 and rollouts at temperature 0.7: together +1.0 and +1.3 points over SFT on seeds 42
        # and 1, where either alone gave +0.7 / 0.0 and -1.3 (docs/benchmarks.md, fourth session); +0.3 on seed 2,
        # and +0.7 on average on the held-out test split (fifth session)
        "rl.matrix_lr_scale": 0.1,
        "rl.temperature": 0.7,
        "rl.steps": 30,
        "rl.prompts_per_step": 16,
        "rl.group_size": 8,
        "rl.drop_zero_variance": True,
        # near SFT's ceiling 2-3 of the 16 groups have signal; sampling up to a second batch for more of them
        # (dynamic sampling) doubled RL's sampled gain over four seeds (+0.69 vs +0.29 points; up to four batches
        # +1.00) for ~1.8x the RL stage's ~50 s (docs/benchmarks.md, tenth session)
        "rl.dynamic_sampling": True,
        "rl.max_sample_batches": 2,
        "rl.checkpoint_every": 10,
        "rl.eval_every": 0,
        "eval.max_examples": 300,
        # 4 completions per question at RL's temperature beside the greedy answer: the sampled policy is what RL
        # trains, and near SFT's ceiling one greedy answer per question cannot show a change of a point or less
        # (nine seeds, docs/benchmarks.md, eighth session)
        "eval.samples": 4,
        "eval.sample_temperature": 0.7,
        "eval.max_new_tokens": 144,  # the level-1 arith target is at most 125 tokens (digit tokens), mean 89
        "eval.batch_size": 64,
        "rl.max_new_tokens": 144,
    },
}


# ---------------------------------------------------------------------------------------------------------
# Parsing values


def _type_of(section_cls: type, name: str) -> Any:
    return get_type_hints(section_cls)[name]


def _parse(raw: Any, typ: Any, key: str) -> Any:
    """Convert a CLI string (or a TOML value) to the field's type, or raise a NanorlError naming the key."""

    def bad(expected: str) -> NanorlError:
        return NanorlError(
            f"invalid value for {key}: {raw!r} is not {expected}",
            hint=f"`nanorl config keys` lists {key} with its type and default",
            exit_code=2,
        )

    origin = get_origin(typ) or typ
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        s = str(raw).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise bad("a boolean (true/false)")
    if typ is int:
        if isinstance(raw, bool):
            raise bad("an integer")
        if isinstance(raw, int):
            return raw
        try:
            return int(str(raw).replace("_", ""))
        except ValueError:
            raise bad("an integer") from None
    if typ is float:
        if isinstance(raw, bool):
            raise bad("a number")
        if isinstance(raw, (int, float)):
            return float(raw)
        try:
            return float(str(raw))
        except ValueError:
            raise bad("a number") from None
    if typ is str:
        if not isinstance(raw, str):
            raise bad("a string")
        return raw
    if origin is list:
        if isinstance(raw, list):
            return [str(x) for x in raw]
        return [s.strip() for s in str(raw).split(",") if s.strip()]
    if origin is dict:
        if isinstance(raw, dict):
            items = raw.items()
        else:
            items = []
            for part in filter(None, (p.strip() for p in str(raw).split(","))):
                if ":" not in part:
                    raise bad("a list of name:weight pairs (e.g. aqua.correct:1,aqua.format:0.1)")
                k, v = part.rsplit(":", 1)
                items.append((k.strip(), v.strip()))
            names = [k for k, _ in items]
            if len(set(names)) < len(names):  # a dict would keep the last weight and drop the others unsaid
                raise bad("a list of name:weight pairs, each name once")
        return {str(k): _parse(v, float, f"{key}[{k}]") for k, v in items}
    raise bad(str(typ))  # pragma: no cover - every field type is handled above


def _targets(cfg: RunConfig, key: str) -> list[tuple[Any, str, str]]:
    """The (section object, field name, dotted key) that `key` names; a bare key names every match."""
    if "." in key:
        section, _, name = key.partition(".")
        obj = getattr(cfg, section, None) if section in SECTIONS else None
        if obj is None or name not in {f.name for f in fields(obj)}:
            raise NanorlError(f"unknown config key {key!r}", hint=_suggest(key), exit_code=2)
        return [(obj, name, key)]
    top = {f.name for f in fields(cfg)} - set(SECTIONS)
    if key in top:
        return [(cfg, key, key)]
    found = [(getattr(cfg, s), key, f"{s}.{key}") for s in SECTIONS if key in {f.name for f in fields(getattr(cfg, s))}]
    if not found:
        raise NanorlError(f"unknown config key {key!r}", hint=_suggest(key), exit_code=2)
    return found


def all_keys() -> list[str]:
    cfg = RunConfig()
    keys = [f.name for f in fields(cfg) if f.name not in SECTIONS]
    for s in SECTIONS:
        keys += [f"{s}.{f.name}" for f in fields(getattr(cfg, s))]
    return keys


def _suggest(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, all_keys(), n=3, cutoff=0.5)
    if close:
        return "did you mean " + ", ".join(close) + "? (`nanorl config keys` lists them all)"
    return "`nanorl config keys` lists every key"


def set_value(cfg: RunConfig, key: str, raw: Any) -> None:
    for obj, name, dotted in _targets(cfg, key):
        setattr(obj, name, _parse(raw, _type_of(type(obj), name), dotted))


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        if "=" not in item:
            raise NanorlError(
                f"override {item!r} is not key=value", hint="e.g. model.depth=12 rl.group_size=16", exit_code=2
            )
        k, v = item.split("=", 1)
        out.append((k.strip(), v))
    return out


# ---------------------------------------------------------------------------------------------------------
# Resolution


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise NanorlError(
            f"config file not found: {p}",
            hint="give the path of a TOML recipe (`nanorl config show --toml` prints one)",
            exit_code=2,
        )
    try:
        with open(p, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise NanorlError(
            f"{p} is not valid TOML: {e}",
            hint="fix that line; `nanorl config show --toml` prints a valid recipe",
            exit_code=2,
        ) from None


def _flatten(d: dict[str, Any], where: str) -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if k in SECTIONS:
            if not isinstance(v, dict):
                raise NanorlError(f"{where}: [{k}] must be a table", exit_code=2)
            out += [(f"{k}.{kk}", vv) for kk, vv in v.items()]
        elif isinstance(v, dict) and k not in {f.name for f in fields(RunConfig)}:  # a table: a misspelt section
            import difflib

            close = difflib.get_close_matches(k, SECTIONS, n=1, cutoff=0.6)
            raise NanorlError(
                f"{where}: unknown config section [{k}]",
                hint=(f"did you mean [{close[0]}]? " if close else "") + f"the sections: {', '.join(SECTIONS)}",
                exit_code=2,
            )
        else:
            out.append((k, v))
    return out


def resolve(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    **explicit: Any,
) -> RunConfig:
    """Build the run config: defaults -> preset -> recipe -> overrides -> `explicit` (CLI flags) -> derive.

    `explicit` takes dotted keys as keyword names with `__` for the dot (`model__depth=12`) or bare names;
    None values are ignored, so CLI options can be passed straight through.
    """
    cfg = RunConfig()
    recipe = load_toml(config_file) if config_file else {}
    pairs = _flatten(recipe, str(config_file)) if recipe else []
    flags = [(k.replace("__", "."), v) for k, v in explicit.items() if v is not None]
    override_pairs = parse_overrides(overrides or [])

    # the preset that applies: CLI flag, then override, then the recipe's own
    chosen = preset
    for k, v in flags + override_pairs:
        if k == "preset":
            chosen = str(v)
    if chosen is None:
        chosen = next((str(v) for k, v in pairs if k == "preset"), None)
    if chosen:
        if chosen not in PRESETS:
            raise NanorlError(f"unknown preset {chosen!r} (available: {', '.join(PRESETS)})", exit_code=2)
        for k, v in PRESETS[chosen].items():
            set_value(cfg, k, v)
        cfg.preset = chosen

    for k, v in pairs:
        set_value(cfg, k, v)
    for k, v in override_pairs + flags:
        set_value(cfg, k, v)
    if chosen:
        cfg.preset = chosen
    derive(cfg)
    try:
        validate(cfg)
    except NanorlError as e:
        # a bare key sets its field in every section: `temperature=0` is fine for eval, not for rl
        for k, v in override_pairs:
            dotted = [d for _, _, d in _targets(cfg, k)] if "." not in k else []
            if len(dotted) > 1 and any(d in e.message for d in dotted):
                fine = [d for d in dotted if d not in e.message] or dotted
                e.hint = f"{k}={v} set {', '.join(dotted)}: name the section, e.g. {fine[0]}={v}"
                break
        raise
    return cfg


# The depth rule's head dimension (nanochat's), and the largest head dimension the attention kernels take
HEAD_DIM = 128
MAX_HEAD_DIM = 256


def head_counts(n_embd: int) -> list[int]:
    """The head counts that split a width `n_embd` into whole heads of an even dimension <= MAX_HEAD_DIM, those
    whose head dimension is nearest HEAD_DIM first."""
    ok = [n for n in range(1, n_embd + 1) if n_embd % n == 0 and (n_embd // n) % 2 == 0]
    ok = [n for n in ok if n_embd // n <= MAX_HEAD_DIM]
    return sorted(ok, key=lambda n: (abs(n_embd // n - HEAD_DIM), -n))


def _default_heads(n_embd: int) -> int:
    """n_head for a width when it is left at 0: width / 128 rounded up (the depth rule's widths are multiples of
    128, so heads of 128), else, when that does not split the width evenly, the valid count nearest heads of 128
    (none valid: the rounded-up count, which validate() then refuses with a hint)."""
    n = max(1, math.ceil(n_embd / HEAD_DIM))
    if n in head_counts(n_embd):
        return n
    return next(iter(head_counts(n_embd)), n)


def derive(cfg: RunConfig) -> None:
    """Fill the fields left at 0 from the depth rule, and the run name.

    Width 64·depth rounded up to a multiple of HEAD_DIM (nanochat rounds the model dimension up to a multiple of
    the head dimension): even depths are exactly 64·depth, an odd depth gets 64 more (depth 5: 384, 3 heads)."""
    m = cfg.model
    if m.n_embd == 0:
        m.n_embd = math.ceil(64 * m.depth / HEAD_DIM) * HEAD_DIM
    if m.n_head == 0:
        m.n_head = _default_heads(m.n_embd)
    if m.n_kv_head == 0:
        m.n_kv_head = m.n_head
    if not cfg.name:
        cfg.name = f"{cfg.task}-{cfg.preset or f'd{m.depth}'}"


def validate(cfg: RunConfig) -> None:
    """Check every field against its rules, then the rules that tie fields together."""
    for section in (cfg, *(getattr(cfg, s) for s in SECTIONS)):
        prefix = "" if section is cfg else next(s for s in SECTIONS if getattr(cfg, s) is section) + "."
        for f in fields(section):
            if f.name in SECTIONS:
                continue
            v = getattr(section, f.name)
            rules = f.metadata
            key = prefix + f.name

            def fail(why: str, key=key, v=v, rules=rules) -> NanorlError:
                return NanorlError(f"invalid value for {key}: {v!r} {why}", hint=rules.get("help"), exit_code=2)

            if "choices" in rules and v not in rules["choices"]:
                raise fail(f"(choose one of {', '.join(rules['choices'])})")
            if "gt" in rules and not v > rules["gt"]:
                raise fail(f"must be > {rules['gt']}")
            if "ge" in rules and not v >= rules["ge"]:
                raise fail(f"must be >= {rules['ge']}")
            if "lt" in rules and not v < rules["lt"]:
                raise fail(f"must be < {rules['lt']}")
            if "le" in rules and not v <= rules["le"]:
                raise fail(f"must be <= {rules['le']}")
            if isinstance(v, float) and not math.isfinite(v):
                raise fail("must be finite")

    m = cfg.model
    if m.n_embd % m.n_head:
        raise NanorlError(
            f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}", hint=_heads_hint(m), exit_code=2
        )
    if m.n_kv_head > m.n_head or m.n_head % m.n_kv_head:
        divisors = [n for n in range(1, m.n_head + 1) if m.n_head % n == 0]
        raise NanorlError(
            f"model.n_kv_head={m.n_kv_head} must divide model.n_head={m.n_head}",
            hint=f"set model.n_kv_head to one of {', '.join(map(str, divisors))} (0: n_head, no grouping)",
            exit_code=2,
        )
    hd = m.n_embd // m.n_head
    if hd % 2 or hd > MAX_HEAD_DIM:
        raise NanorlError(
            f"head dimension {hd} (model.n_embd={m.n_embd} / model.n_head={m.n_head}) must be even and at most"
            f" {MAX_HEAD_DIM}",
            hint=_heads_hint(m),
            exit_code=2,
        )
    for stage in (f.name for f in fields(cfg) if isinstance(getattr(cfg, f.name), TrainConfig)):
        t = getattr(cfg, stage)
        if t.warmup_ratio + t.warmdown_ratio > 1:  # the factor would drop from 1 to the warmdown's middle at once
            raise NanorlError(
                f"{stage}.warmup_ratio={t.warmup_ratio} and {stage}.warmdown_ratio={t.warmdown_ratio} add up to more"
                " than 1: the warmup would run into the warmdown",
                hint="lower one of them so that the two add up to at most 1",
                exit_code=2,
            )
    check_run_name(cfg.name)
    if not cfg.eval.splits:  # the eval stage would evaluate nothing, and the report show no accuracy
        raise NanorlError("eval.splits is empty: name the splits to evaluate, e.g. eval.splits=dev,test", exit_code=2)
    for split in cfg.eval.splits:
        if split not in ("train", "dev", "validation", "test"):
            raise NanorlError(f"invalid value for eval.splits: {split!r} (train, dev, validation or test)", exit_code=2)


def check_run_name(name: str) -> str:
    """`name` if it can name a run folder (letters, digits, '.', '_', '-'; no path), else a NanorlError."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise NanorlError(f"invalid run name {name!r}: use letters, digits, '.', '_' and '-'", exit_code=2)
    return name


def _heads_hint(m: ModelConfig) -> str:
    """What to set when model.n_embd and model.n_head do not make whole, even heads of at most MAX_HEAD_DIM."""
    counts = head_counts(m.n_embd)
    if not counts:
        return (
            f"no head count splits a width of {m.n_embd} into even heads of at most {MAX_HEAD_DIM}: set model.n_embd"
            f" to a multiple of {HEAD_DIM} (or leave it and model.n_head at 0 for the depth rule)"
        )
    eg = ", ".join(f"{n} (heads of {m.n_embd // n})" for n in counts[:3])
    return (
        f"set model.n_head to a divisor of {m.n_embd}, e.g. {eg}, or leave it at 0 to derive it"
        " (`nanorl config show` prints the result)"
    )


# ---------------------------------------------------------------------------------------------------------
# Serialisation


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_string(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def _toml_string(s: str) -> str:
    """A TOML basic string. Not json.dumps: JSON escapes a character beyond the BMP (an emoji) as a surrogate
    pair, which TOML refuses, and leaves DEL raw, which TOML refuses too. Here only the quote, the backslash and
    the control characters are escaped; every other character is written as it is (the file is UTF-8)."""
    out = []
    for ch in s:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch < " " or ch == "\x7f":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def to_toml(cfg: RunConfig) -> str:
    d = cfg.to_dict()
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if k not in SECTIONS]
    for s in SECTIONS:
        lines += ["", f"[{s}]"] + [f"{k} = {_toml_value(v)}" for k, v in d[s].items()]
    return "\n".join(lines) + "\n"


# Keys that earlier versions wrote into run.toml and this one no longer has: a run folder from before still loads.
# checkpoint.keep: accepted, but every stage always kept exactly one checkpoint (its latest).
RETIRED_KEYS = frozenset({"checkpoint.keep"})


def from_toml_file(path: str | Path) -> RunConfig:
    """Read a resolved run.toml back (no preset is re-applied: every value is in the file).

    A key or value the file holds that this version does not accept is a NanorlError naming the file, with what
    to do about it (edit that line, or start the run again)."""
    cfg = RunConfig()
    try:
        for k, v in _flatten(load_toml(path), str(path)):
            if k in RETIRED_KEYS:
                continue
            set_value(cfg, k, v)
        derive(cfg)
        validate(cfg)
    except NanorlError as e:
        if str(path) in e.message:  # load_toml's and _flatten's errors name the file already
            raise
        raise NanorlError(
            f"{path}: {e.message}",
            hint="; ".join(
                filter(None, [e.hint, f"edit {path} to fix it, or delete the run folder and start the run again"])
            ),
            exit_code=e.exit_code,
        ) from None
    return cfg


def config_hash(cfg: RunConfig, sections: tuple[str, ...] = ("model",)) -> str:
    """A short hash of the sections a checkpoint depends on (a model checkpoint: the architecture)."""
    d = cfg.to_dict()
    if "model" in sections:
        # the attention backend computes the same function of the same weights: a model trained with one may
        # be resumed or evaluated with another. Hashed as "auto" (not dropped), so the hashes checkpoints
        # recorded with the default stay valid.
        d["model"]["attention"] = "auto"
    blob = json.dumps({s: d[s] for s in sections}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# Where runs live


def nanorl_home() -> Path:
    return Path(os.environ.get("NANORL_HOME") or "~/.cache/nanorl").expanduser()


def run_dir(name: str) -> Path:
    return nanorl_home() / "runs" / name


def write_run_config(cfg: RunConfig) -> Path:
    """Write runs/<name>/run.toml atomically and return the run folder."""
    d = run_dir(cfg.name)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "run.toml.tmp"
    tmp.write_text(to_toml(cfg), encoding="utf-8")  # TOML is UTF-8 whatever the locale
    tmp.replace(d / "run.toml")
    return d
