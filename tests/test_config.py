"""Run configuration: the depth rule, presets, recipes, overrides, validation, serialisation."""

from __future__ import annotations

import pytest

from nanorl.api import NanorlError
from nanorl.config import (
    PRESETS,
    RunConfig,
    config_hash,
    from_toml_file,
    resolve,
    run_dir,
    to_toml,
    write_run_config,
)


@pytest.mark.parametrize("depth,width,heads", [(8, 512, 4), (12, 768, 6), (20, 1280, 10), (26, 1664, 13)])
def test_depth_rule(depth, width, heads):
    cfg = resolve(preset=f"d{depth}")
    assert (cfg.model.depth, cfg.model.n_embd, cfg.model.n_head, cfg.model.n_kv_head) == (depth, width, heads, heads)
    assert cfg.head_dim == 128
    assert cfg.name == f"arith-d{depth}"


@pytest.mark.parametrize("depth", range(1, 27))
def test_depth_rule_gives_a_valid_model_at_every_depth(depth):
    """Odd depths too (64·5 = 320 has no whole number of 128-wide heads): the width is 64·d rounded up to a
    multiple of 128, heads of 128; an even depth's width stays exactly 64·d (checkpoints depend on it)."""
    m = resolve(overrides=[f"depth={depth}"]).model
    assert m.n_embd == (64 * depth if depth % 2 == 0 else 64 * (depth + 1))
    assert m.n_embd // m.n_head == 128 and m.n_embd % m.n_head == 0 and m.n_kv_head == m.n_head


def test_an_explicit_width_gets_heads_that_divide_it():
    # ceil(320 / 128) = 3 heads do not divide 320: the count whose heads are nearest 128 wide (2 of 160)
    m = resolve(overrides=["model.n_embd=320"]).model
    assert (m.n_head, m.n_embd // m.n_head) == (2, 160)
    # where ceil(width / 128) divides it, that count, as before
    assert resolve(overrides=["model.n_embd=192"]).model.n_head == 2


def test_heads_that_do_not_divide_the_width_say_what_to_set():
    with pytest.raises(NanorlError) as err:
        resolve(overrides=["depth=5", "model.n_head=5"])
    assert "model.n_embd=384 is not divisible by model.n_head=5" in err.value.message
    assert "set model.n_head to a divisor of 384, e.g. 3 (heads of 128)" in err.value.hint
    with pytest.raises(NanorlError) as err:
        resolve(overrides=["model.n_embd=1024", "model.n_head=1"])
    assert "head dimension 1024" in err.value.message and "e.g. 8 (heads of 128)" in err.value.hint
    with pytest.raises(NanorlError) as err:
        resolve(overrides=["model.n_embd=321"])
    assert "multiple of 128" in err.value.hint


def test_vocab_size_minimum_is_the_tokenizers():
    from nanorl.tokenizer import MIN_VOCAB_SIZE, SPECIAL_TOKENS

    assert 256 + len(SPECIAL_TOKENS) == MIN_VOCAB_SIZE
    with pytest.raises(NanorlError, match=f"must be >= {MIN_VOCAB_SIZE}"):
        resolve(overrides=[f"model.vocab_size={MIN_VOCAB_SIZE - 1}"])
    assert resolve(overrides=[f"model.vocab_size={MIN_VOCAB_SIZE}"]).model.vocab_size == MIN_VOCAB_SIZE


def test_a_bad_run_toml_names_the_file_and_says_how_to_fix_it(tmp_path):
    path = write_run_config(resolve(preset="tiny")) / "run.toml"
    path.write_text(path.read_text().replace("[rl]\nsteps = 30", "[rl]\nsteps = -5"))
    with pytest.raises(NanorlError) as err:
        from_toml_file(path)
    assert err.value.message.startswith(f"{path}: invalid value for rl.steps: -5")
    assert f"edit {path}" in err.value.hint and err.value.exit_code == 2


def test_tiny_preset_applies_and_is_recorded():
    cfg = resolve(preset="tiny")
    for key, value in PRESETS["tiny"].items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value
    assert cfg.preset == "tiny" and cfg.name == "arith-tiny"


def test_overrides_are_parsed_to_the_field_type():
    cfg = resolve(
        overrides=[
            "rl.group_size=16",
            "model.softcap=0",
            "rl.std_normalize=false",
            "eval.splits=dev,test",
            "rl.rewards=aqua.correct:1,aqua.format:0.1",
            "seed=7",
        ]
    )
    assert cfg.rl.group_size == 16 and isinstance(cfg.rl.group_size, int)
    assert cfg.model.softcap == 0.0 and isinstance(cfg.model.softcap, float)
    assert cfg.rl.std_normalize is False
    assert cfg.eval.splits == ["dev", "test"]
    assert cfg.rl.rewards == {"aqua.correct": 1.0, "aqua.format": 0.1}
    assert cfg.seed == 7


def test_bare_keys_set_every_section_that_has_them():
    cfg = resolve(overrides=["steps=5", "depth=12"])
    assert [cfg.base.steps, cfg.mid.steps, cfg.sft.steps, cfg.rl.steps] == [5, 5, 5, 5]
    assert cfg.model.depth == 12 and cfg.model.n_embd == 768


def test_explicit_width_beats_the_depth_rule():
    cfg = resolve(overrides=["depth=4", "model.n_embd=256", "model.n_head=2", "model.n_kv_head=1"])
    assert (cfg.model.n_embd, cfg.model.n_head, cfg.model.n_kv_head, cfg.head_dim) == (256, 2, 1, 128)


def test_a_bare_key_that_fails_in_one_section_says_which_sections_it_set():
    with pytest.raises(NanorlError, match="rl.temperature") as err:
        resolve(overrides=["temperature=0"])  # eval.temperature takes 0 (greedy), rl.temperature does not
    assert err.value.hint == (
        "temperature=0 set rl.temperature, eval.temperature: name the section, e.g. eval.temperature=0"
    )
    assert resolve(overrides=["eval.temperature=0"]).eval.temperature == 0


@pytest.mark.parametrize(
    "override,message",
    [
        ("depth=0", "model.depth: 0 must be >= 1"),
        ("lr=-1", "base.lr: -1.0 must be > 0"),
        ("model.depth=abc", "model.depth: 'abc' is not an integer"),
        ("model.attention=flash", "choose one of auto, triton, sdpa, eager"),
        ("rl.std_normalize=maybe", "not a boolean"),
        ("nosuchkey=1", "unknown config key 'nosuchkey'"),
        ("model.nosuch=1", "unknown config key 'model.nosuch'"),
        ("model.n_head=3", "not divisible by model.n_head=3"),
        ("model.n_kv_head=3", "must divide model.n_head"),
        ("name=../escape", "invalid run name"),
        ("rl.rewards=aqua.correct", "name:weight pairs"),
        ("rl.rewards=aqua.correct:1,aqua.correct:0", "name:weight pairs, each name once"),
        ("optim.adam_beta2=1.0", "must be < 1"),
        ("eval.splits=dev,bogus", "eval.splits"),
        ("eval.splits=", "eval.splits is empty"),
        ("sft.warmup_ratio=0.1", "sft.warmup_ratio=0.1 and sft.warmdown_ratio=1.0 add up to more than 1"),
    ],
)
def test_validation_names_the_bad_key_and_value(override, message):
    with pytest.raises(NanorlError) as err:
        resolve(overrides=[override])
    assert message in err.value.message
    assert err.value.exit_code == 2
    if " is not " in message:  # a value of the wrong type: says where the key's type is shown
        assert err.value.hint == f"`nanorl config keys` lists {override.split('=')[0]} with its type and default"


def test_unknown_key_suggests_a_close_one():
    with pytest.raises(NanorlError) as err:
        resolve(overrides=["model.dpeth=4"])
    assert "model.depth" in err.value.hint


def test_toml_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        'preset = "tiny"\ntask = "aqua"\n\n[rl]\ngroup_size = 4\ntemperature = 0.7\n\n[model]\nseq_len = 512\n'
    )
    cfg = resolve(config_file=recipe, overrides=["rl.group_size=12"])
    assert cfg.preset == "tiny" and cfg.model.n_embd == PRESETS["tiny"]["model.n_embd"]
    assert cfg.task == "aqua" and cfg.model.seq_len == 512 and cfg.rl.temperature == 0.7
    assert cfg.rl.group_size == 12  # the command line wins over the recipe
    # a preset on the command line wins over the recipe's
    assert resolve(preset="d8", config_file=recipe).model.depth == 8


@pytest.mark.parametrize(
    "text,message",
    [
        ("[model]\ndepth = 'eight'\n", "model.depth: 'eight' is not an integer"),
        ("[model]\nwidth = 3\n", "unknown config key 'model.width'"),
        ("model = 3\n", "[model] must be a table"),
        ("[model\n", "is not valid TOML"),
    ],
)
def test_bad_recipes_are_clear_errors(tmp_path, text, message):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    with pytest.raises(NanorlError, match=message.replace("[", r"\[").replace("]", r"\]")):
        resolve(config_file=recipe)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(NanorlError, match="config file not found"):
        resolve(config_file=tmp_path / "nope.toml")


def test_run_toml_round_trip(tmp_path):
    cfg = resolve(
        preset="tiny",
        overrides=[
            "rl.rewards=arith.correct:1,arith.format:0.1",
            "eval.splits=dev,test",
            "checkpoint.store=s3://bucket/p",
        ],
    )
    path = write_run_config(cfg)
    assert path == run_dir(cfg.name) and str(path).startswith(str(tmp_path))
    back = from_toml_file(path / "run.toml")
    assert back == cfg
    assert to_toml(back) == to_toml(cfg)

    # a run.toml written by an earlier version, with a key this one retired, still loads
    toml = path / "run.toml"
    toml.write_text(toml.read_text().replace("[checkpoint]\n", "[checkpoint]\nkeep = 3\n"))
    assert "keep = 3" in toml.read_text()
    assert from_toml_file(toml) == cfg


def test_config_hash_tracks_the_architecture_only():
    a = resolve(preset="tiny")
    b = resolve(preset="tiny", overrides=["rl.group_size=4"])
    c = resolve(preset="tiny", overrides=["model.seq_len=512"])
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_defaults_are_valid_and_independent():
    a, b = RunConfig(), RunConfig()
    a.eval.splits.append("test")
    assert b.eval.splits == ["dev"]  # no shared mutable defaults


def test_run_toml_round_trips_any_string(tmp_path):
    """Strings are written as TOML basic strings: a character outside the BMP (an emoji in a path) must not
    become JSON's surrogate-pair escape, which TOML refuses, nor DEL stay raw, which TOML refuses too."""
    odd = ["data.data_dir=/data/😀/été", 'telemetry.wandb_project=a\x7fb\tc"d\\e', "rl.rewards=x😀:1"]
    cfg = resolve(overrides=odd)
    path = write_run_config(cfg) / "run.toml"
    assert from_toml_file(path) == cfg


def test_seed_is_bounded_where_the_stages_can_use_it():
    """The RL stage seeds torch generators with (seed * 1_000_003 + step) * 64 + ...: a seed past 2^32 - 1
    overflowed torch's 64-bit seed there, after the other stages had trained."""
    assert resolve(overrides=[f"seed={2**32 - 1}"]).seed == 2**32 - 1
    with pytest.raises(NanorlError, match=f"invalid value for seed: {2**32} must be <= {2**32 - 1}"):
        resolve(overrides=[f"seed={2**32}"])


def test_the_attention_backend_is_not_part_of_the_model_hash():
    """The backend computes the same function with the same weights: a run trained with `auto` may be resumed
    or evaluated with model.attention=eager or sdpa (its checkpoints' hashes must still match)."""
    hashes = {config_hash(resolve(overrides=[f"model.attention={a}"])) for a in ("auto", "triton", "sdpa", "eager")}
    assert len(hashes) == 1
    assert config_hash(resolve()) == "9ebfb2f48f3f579d"  # the hash checkpoints already recorded
    # so a run goes on with another backend, and the rerun names the change like any other
    from nanorl.stages.runner import changed_values, check_run_config

    write_run_config(resolve())
    new = resolve(overrides=["model.attention=eager"])
    assert changed_values(check_run_config(new), new) == ["model.attention 'auto' -> 'eager'"]


def test_an_unknown_recipe_section_suggests_the_sections(tmp_path):
    recipe = tmp_path / "typo.toml"
    recipe.write_text("[modle]\ndepth = 4\n")
    with pytest.raises(NanorlError) as err:
        resolve(config_file=recipe)
    assert "unknown config section [modle]" in err.value.message
    assert "did you mean [model]?" in err.value.hint
