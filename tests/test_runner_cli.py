"""The pipeline runner and the commands around it (pipeline, train, eval) as a user meets them: input checked
before anything is written, deleted or computed, and errors that say where they come from."""

from __future__ import annotations

import io
import json
import shutil

import pytest
from rich.console import Console

from nanorl import checkpoint as ckpt
from nanorl.api import NanorlError
from nanorl.config import resolve, run_dir, write_run_config
from nanorl.stages.runner import run_pipeline

# a model and an eval small enough that the tokenizer trains and the eval of two questions runs in seconds
TINY = [
    "model.depth=1",
    "model.n_embd=32",
    "model.n_head=1",
    "model.seq_len=128",
    "tokenizer.train_chars=20000",
    "eval.max_examples=2",
    "eval.max_new_tokens=8",
    "eval.samples=0",
    "eval.mode=generative",
    "telemetry.console=false",
]


def _cfg(name: str, *extra: str):
    return resolve(preset="tiny", overrides=[*TINY, f"name={name}", *extra])


def _fake_run(name: str, *extra: str):
    """A run whose tokenizer is trained and whose model stages hold untrained checkpoints, all marked DONE."""
    from nanorl.config import MODEL_STAGES
    from nanorl.stages.runner import make_context

    cfg = _cfg(name, *extra)
    run_pipeline(cfg, only="tokenizer")
    ctx = make_context(cfg)
    for stage in MODEL_STAGES:
        ctx.save(stage, ctx.new_model(), None, {"step": 0})
        ckpt.mark_done(ctx.stage_dir(stage))
    ctx.bus.close()
    return cfg


def _main(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit code, stdout, stderr as one line of single spaces)."""
    from nanorl.cli import main, ui

    widths = ui.console.width, ui.err_console.width
    ui.console.width = ui.err_console.width = 1000  # no line wrapped inside a path
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        ui.console.width, ui.err_console.width = widths
    out = capsys.readouterr()
    return code, out.out, " ".join(out.err.split())


def _snapshot(name: str) -> dict[str, bytes]:
    d = run_dir(name)
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ---- steps and run.toml -------------------------------------------------------------------------------------
def test_negative_steps_are_refused_before_run_toml_is_written(capsys):
    from nanorl.cli.pipeline_cmd import parse_steps

    assert parse_steps(["base=200", " rl = 5", "sft=0"]) == {"base": 200, "rl": 5, "sft": 0}
    for bad in ("rl=-5", "rl=-1", "rl=x", "rl=", "=3", "rl", "rl=1.5"):
        with pytest.raises(NanorlError, match="whole number >= 0") as err:
            parse_steps([bad])
        assert err.value.exit_code == 2

    # the runner validates the config with its steps before it writes run.toml
    write_run_config(_cfg("neg"))
    before = _snapshot("neg")
    with pytest.raises(NanorlError, match=r"rl\.steps: -5 must be >= -1"):
        run_pipeline(_cfg("neg"), only="report", steps={"rl": -5})
    assert _snapshot("neg") == before

    code, _, err = _main(
        capsys, "pipeline", "--task", "arith", "--preset", "tiny", "--name", "neg2", "--steps", "rl=-5"
    )
    assert code == 2 and "'rl=-5'" in err and not run_dir("neg2").exists()
    code, _, err = _main(capsys, "train", "rl", "--run", "neg", "--steps", "-3")
    assert code == 2 and "--steps" in err
    assert _snapshot("neg") == before


def test_an_invalid_run_toml_is_named_in_the_error(capsys):
    from nanorl.stages.runner import read_run_config

    cfg = _cfg("badtoml")
    cfg.rl.steps = -5  # as an older nanorl wrote it
    write_run_config(cfg)
    toml = run_dir("badtoml") / "run.toml"
    with pytest.raises(NanorlError, match="rl.steps") as err:
        read_run_config(toml)
    assert str(toml) in err.value.message and str(toml) in err.value.hint
    code, _, err = _main(capsys, "train", "rl", "--run", "badtoml", "--steps", "1")
    assert code == 2 and f"{toml}: invalid value for rl.steps: -5" in err


# ---- the inputs, checked before anything is written or deleted ----------------------------------------------
def test_a_typo_fails_before_a_finished_stage_is_removed(capsys):
    _fake_run("typo")
    before = _snapshot("typo")
    bad = "rl.rewards=nosuch.reward:1"
    with pytest.raises(NanorlError, match="unknown reward 'nosuch.reward'"):
        run_pipeline(_cfg("typo", bad), only="rl")
    with pytest.raises(NanorlError, match="unknown reward 'nosuch.reward'"):
        run_pipeline(_cfg("typo", bad), from_stage="rl")
    assert _snapshot("typo") == before  # rl/ and run.toml as they were
    code, _, err = _main(capsys, "train", "rl", "--run", "typo", "--steps", "1", bad)
    assert code == 2 and "unknown reward" in err
    assert _snapshot("typo") == before


def test_a_start_checkpoint_this_run_cannot_load_fails_before_its_stage_is_removed(capsys):
    """`nanorl train rl --checkpoint OTHER` with OTHER of another tokenizer or architecture: refused as bad input
    with the run as it was (found only when the stage loaded it, it cost the run its finished rl/ and rewrote
    run.toml)."""
    _fake_run("own")
    _fake_run("othertok", "tokenizer.max_digits=2")  # the same model, another tokenizer
    _fake_run("wider", "model.n_embd=64")
    before = _snapshot("own")
    code, _, err = _main(capsys, "train", "rl", "--run", "own", "--checkpoint", "othertok/sft", "--steps", "2")
    assert code == 2 and "trained with another tokenizer" in err
    code, _, err = _main(capsys, "train", "rl", "--run", "own", "--checkpoint", "wider/sft", "--steps", "2")
    assert code == 2 and "is of another model than run own's (model.n_embd 64 vs 32)" in err
    assert _snapshot("own") == before


def test_a_stage_whose_inputs_never_ran_fails_before_anything_is_written():
    with pytest.raises(NanorlError, match="needs the tokenizer"):
        run_pipeline(_cfg("fresh"), only="base")
    with pytest.raises(NanorlError, match="needs the tokenizer"):
        run_pipeline(_cfg("fresh"), from_stage="sft")
    assert not run_dir("fresh").exists()
    run_pipeline(_cfg("fresh"), only="tokenizer")
    with pytest.raises(NanorlError, match="stage sft needs a trained model"):
        run_pipeline(_cfg("fresh"), only="sft")


def test_missing_data_fails_before_the_first_stage(tmp_path):
    # the aqua task from a folder without its train split, pretrained on a text file: mid would fail, after the
    # tokenizer and base had run
    pytest.importorskip("nanorl_aqua")
    row = {"question": "1+1?", "options": ["A)1", "B)2", "C)3", "D)4", "E)5"], "rationale": "2", "correct": "B"}
    (tmp_path / "dev.json").write_text((json.dumps(row) + "\n") * 4)
    text = tmp_path / "corpus.jsonl"
    text.write_text("".join(json.dumps({"text": f"document {i}: " + "one two three " * 60}) + "\n" for i in range(40)))
    aqua = [*TINY, "task=aqua", f"data.data_dir={tmp_path}", "name=aq", "steps=1", "base.device_batch_size=2"]
    with pytest.raises(NanorlError, match="train.json"):
        run_pipeline(resolve(preset="tiny", overrides=[*aqua, f"data.corpus={text}"]))
    assert not run_dir("aq").exists()
    # a corpus that is not there: before the tokenizer, too
    with pytest.raises(NanorlError, match="no corpus files"):
        run_pipeline(resolve(preset="tiny", overrides=[*aqua, f"data.corpus={tmp_path / 'nope.jsonl'}"]))
    assert not run_dir("aq").exists()


def test_an_unknown_task_leaves_no_run_folder():
    from nanorl.stages.runner import make_context

    cfg = _cfg("bad1", "task=nosuch")
    with pytest.raises(NanorlError, match="unknown task 'nosuch'"):
        run_pipeline(cfg)
    with pytest.raises(NanorlError, match="unknown task 'nosuch'"):
        make_context(cfg)
    assert not run_dir("bad1").exists()


# ---- the model's size ---------------------------------------------------------------------------------------
def test_a_pipeline_needs_a_size(capsys):
    from nanorl.cli.pipeline_cmd import require_size

    code, _, err = _main(capsys, "pipeline")
    assert code == 2 and "--preset tiny on a CPU, --depth 8 on a GPU" in err
    assert not (run_dir("arith-d8")).exists()
    require_size("tiny", None, None, [])
    require_size(None, 8, None, [])
    require_size(None, None, "recipe.toml", [])
    for given in ("depth=4", "model.depth=4", "preset=tiny"):
        require_size(None, None, None, [given])


def test_a_gpu_sized_model_on_the_cpu_is_warned_about(monkeypatch):
    from nanorl.stages import runner

    monkeypatch.setattr(runner, "_stage_fn", lambda stage: lambda ctx: {})  # no training: what is printed first
    for name, cfg, warned in (
        ("d8", resolve(overrides=["device=cpu", "name=d8", "telemetry.console=false"]), True),
        ("small", _cfg("small", "device=cpu"), False),
    ):
        ckpt.mark_done(run_dir(name) / "tokenizer")
        out = io.StringIO()
        run_pipeline(cfg, only="base", console=Console(file=out, width=300))
        text = out.getvalue()
        assert ("depth-8 model with 524,288-token steps is sized for a GPU" in text) == warned, text


# ---- --only, --from, the report -----------------------------------------------------------------------------
def test_only_and_from_together_are_refused():
    with pytest.raises(NanorlError, match="together") as err:
        run_pipeline(_cfg("both"), only="eval", from_stage="rl")
    assert err.value.exit_code == 2 and not run_dir("both").exists()


def test_only_eval_keeps_the_other_eval_files_and_rebuilds_the_report():
    _fake_run("ev")
    first = run_pipeline(_cfg("ev"), only="eval")
    assert list(first) == ["eval", "report"]  # the report shows the new evaluation
    evdir = run_dir("ev") / "eval"
    # a file `nanorl eval --split test --checkpoint ev/sft` wrote: not the eval stage's to remove
    shutil.copy(evdir / "arith-dev-sft.json", evdir / "arith-test-sft.json")
    (run_dir("ev") / "report.md").unlink()
    run_pipeline(_cfg("ev"), only="eval")
    assert (evdir / "arith-test-sft.json").is_file() and ckpt.is_done(evdir)
    assert (run_dir("ev") / "report.md").is_file()
    run_pipeline(_cfg("ev"), from_stage="eval")
    assert (evdir / "arith-test-sft.json").is_file()


def test_stage_start_lines_say_what_the_tokenizer_and_eval_do_and_count_steps_in_english(capsys):
    """Piped (plain lines), a stage announces itself: a training stage with its steps ("1 step", not "1 steps"),
    the tokenizer and eval, which have no steps, with what they work on."""
    _fake_run("lines")
    on = ("telemetry.console=true", "eval.splits=dev,test")
    capsys.readouterr()
    run_pipeline(_cfg("lines", *on), only="tokenizer")
    run_pipeline(_cfg("lines", *on), only="eval")  # the fake run's rl and sft models
    run_pipeline(_cfg("lines", *on, "sft.steps=1"), only="sft")
    stages = ("tokenizer", "base", "mid", "sft", "rl", "eval")
    err = capsys.readouterr().err.splitlines()
    # not the batch layout, nor the rows cut by this test config's 128-token seq_len
    starts = [x for x in err if x.split(":")[0] in stages and "tokens a step" not in x and "longer than" not in x]
    assert starts == [
        "tokenizer: a 1,024-token BPE on the arith task's text (at most 20,000 characters)",
        "eval: the rl and sft models on dev, test (generative)",
        "sft: 1 step",
    ], starts
    # a stage that resumes says so after its start line
    from nanorl.stages.common import Interrupted

    with pytest.raises(Interrupted):
        run_pipeline(_cfg("lines", *on, "sft.steps=2", "sft.checkpoint_every=1"), only="sft", stop_after={"sft": 1})
    capsys.readouterr()
    run_pipeline(_cfg("lines", *on, "sft.steps=2", "sft.checkpoint_every=1"))  # (the resume: no --only)
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("sft: ") and "tokens a step" not in x]
    assert [x for x in err if "longer than" not in x][:2] == ["sft: 2 steps", "sft: resuming at step 1/2"], err


def test_the_report_line_is_printed_only_when_there_is_a_report(monkeypatch, tmp_path):
    from nanorl.cli import pipeline_cmd

    out = io.StringIO()
    monkeypatch.setattr(pipeline_cmd, "console", Console(file=out, width=300))
    pipeline_cmd.show_results({"tokenizer": {"vocab_size": 500, "wall_s": 1.0}}, tmp_path)
    assert "report:" not in out.getvalue()
    (tmp_path / "report.md").write_text("# run\n")
    pipeline_cmd.show_results({"report": {"wall_s": 0.0}}, tmp_path)
    assert f"report: {tmp_path / 'report.md'}" in out.getvalue()


# ---- eval and train arguments -------------------------------------------------------------------------------
def test_eval_finds_the_compare_checkpoint_before_evaluating(monkeypatch, capsys):
    from nanorl.stages import eval as ev

    _fake_run("cmp")
    calls = []

    def evaluate(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("evaluated")

    monkeypatch.setattr(ev, "evaluate", evaluate)
    code, _, err = _main(capsys, "eval", "--checkpoint", "cmp", "--compare", "nosuch")
    assert (code, calls) == (2, []) and "no checkpoint at 'nosuch'" in err


def test_eval_of_the_validation_split_writes_the_dev_file(capsys):
    """`--split validation` and `--split dev` are one split: one file name (as the eval stage writes), and the
    same example ids inside, so either file compares with the other."""
    _fake_run("val")
    args = ("eval", "--checkpoint", "val/sft", "--max-examples", "1", "--no-compile", "--json")
    code, out, err = _main(capsys, *args, "--split", "validation")
    assert code == 0, err
    evdir = run_dir("val") / "eval"
    assert sorted(p.name for p in evdir.glob("*.json")) == ["arith-dev-sft.json"]
    ids = [r["id"] for r in json.loads(out)["modes"]["generative"]["records"]]
    code, out, err = _main(capsys, *args, "--split", "dev")
    assert code == 0 and [r["id"] for r in json.loads(out)["modes"]["generative"]["records"]] == ids
    assert sorted(p.name for p in evdir.glob("*.json")) == ["arith-dev-sft.json"]


def test_eval_on_its_own_tells_the_telemetry_hooks_as_the_eval_stage_does(monkeypatch, capsys):
    """A plugin's on_eval (one that uploads results, say) hears of `nanorl eval` too, once per mode, and what it
    returns goes into the run's metrics.jsonl with the evaluation, as in the pipeline's eval stage. The hooks
    hear an eval stage start and end around it (the wandb sink opens its run on the start), which metrics.jsonl
    does not record: the run's own eval stage was not re-run."""
    from nanorl.api import TelemetryHook
    from nanorl.telemetry import Telemetry, read_metrics

    seen, calls = [], []

    class Uploader(TelemetryHook):
        name = "test.uploader"

        def on_stage_start(self, info):
            calls.append(("start", info.stage, info.run_name, info.config["name"]))

        def on_eval(self, result):
            seen.append(result)
            calls.append(("eval", result.metrics["mode"]))
            return {"uploaded": 1}

        def on_stage_end(self, info, metrics):
            calls.append(("end", info.stage))

    registered = Telemetry._registered_hooks
    monkeypatch.setattr(Telemetry, "_registered_hooks", staticmethod(lambda cfg: [*registered(cfg), Uploader()]))
    _fake_run("hooked")
    calls.clear()  # (the fake run's own stages)
    args = ("eval", "--checkpoint", "hooked/sft", "--max-examples", "2", "--mode", "both", "--no-compile", "--json")
    code, out, err = _main(capsys, *args)
    assert code == 0, err
    res = json.loads(out)
    assert [(r.task, r.split, r.metrics["mode"], r.metrics["model_stage"]) for r in seen] == [
        ("arith", "dev", "generative", "sft"),
        ("arith", "dev", "categorical", "sft"),
    ]
    accuracy = [res["modes"][m]["accuracy"] for m in ("generative", "categorical")]
    assert [r.metrics["accuracy"] for r in seen] == accuracy
    assert "records" not in seen[0].metrics  # the summaries, as the eval stage hands them over
    assert calls == [
        ("start", "eval", "hooked", "hooked"),
        ("eval", "generative"),
        ("eval", "categorical"),
        ("end", "eval"),
    ]
    records = read_metrics(run_dir("hooked"))
    assert not [r for r in records if r.get("stage") == "eval" and r.get("kind") in ("start", "end")]
    evals = [r for r in records if r.get("kind") == "eval"]
    assert [(r["stage"], r["metrics"]["accuracy"], r["metrics"]["uploaded"]) for r in evals] == [
        ("eval", accuracy[0], 1),
        ("eval", accuracy[1], 1),
    ]


def test_bad_eval_and_train_arguments_exit_2(capsys):
    code, _, err = _main(capsys, "eval", "--checkpoint", "x", "--max-examples", "-5")
    assert code == 2 and "--max-examples" in err
    code, _, err = _main(capsys, "eval", "--checkpoint", "x", "--split", "bogus")
    assert code == 2 and "--split 'bogus': dev, validation, test or train" in err
    code, _, err = _main(capsys, "eval", "--checkpoint", "nosuch")
    assert code == 2 and "no checkpoint at 'nosuch'" in err
    code, _, err = _main(capsys, "train", "rl", "--run", "nosuch")
    assert code == 2 and "no run named 'nosuch'" in err


# ---- run.toml changes on a re-run ---------------------------------------------------------------------------
def test_a_rerun_says_which_values_of_run_toml_it_changes():
    def run(*extra: str) -> str:
        out = io.StringIO()
        run_pipeline(_cfg("re", *extra), only="report", console=Console(file=out, width=300))
        return out.getvalue()

    assert "run.toml" not in run()  # a new run: nothing changed
    text = run("base.steps=7", "eval.samples=2", "eval.splits=dev,test")
    assert "run.toml: base.steps 1000 -> 7, eval.splits ['dev'] -> ['dev', 'test'], eval.samples 0 -> 2" in text
    assert "run.toml" not in run("base.steps=7", "eval.samples=2", "eval.splits=dev,test")
