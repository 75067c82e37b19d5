"""The CLI as a user meets it: version, help without heavy imports, errors without tracebacks."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
from testkit import heavy_imports

from nanorl import __version__


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "nanorl", *args], capture_output=True, text=True, env=e, timeout=60)


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"nanorl {__version__}"


def test_help_and_plugins_list_import_no_heavy_library():
    assert heavy_imports(["--help"], ["plugins", "list"], ["config", "show"]) == []


def test_config_show_json_resolves_overrides():
    r = run_cli("config", "show", "--json", "--depth", "12", "rl.group_size=4", "--task", "aqua", "--data-dir", "/d")
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["model"]["n_embd"] == 768 and cfg["rl"]["group_size"] == 4 and cfg["name"] == "aqua-d12"
    assert cfg["data"]["data_dir"] == "/d"
    assert r.stderr == ""  # aqua's plugin is installed
    # a task no installed plugin provides: shown, with a warning that a pipeline here would refuse it
    r = run_cli("config", "show", "--json", "--preset", "tiny", "--task", "nope")
    assert r.returncode == 0 and json.loads(r.stdout)["task"] == "nope"
    assert r.stderr.startswith("warning: no installed plugin provides task 'nope'"), r.stderr


def test_config_show_table_and_toml():
    r = run_cli("config", "show", "--preset", "tiny")
    assert r.returncode == 0 and "model.n_embd" in r.stdout and "4 layers, width 128" in r.stdout
    r = run_cli("config", "show", "--preset", "tiny", "--toml")
    assert r.returncode == 0 and r.stdout.startswith('name = "arith-tiny"') and "[model]" in r.stdout


def test_bad_input_is_one_red_line_with_exit_code_2_and_no_traceback():
    r = run_cli("config", "show", "depth=0")
    assert r.returncode == 2
    assert "error: invalid value for model.depth: 0 must be >= 1" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    r = run_cli("--debug", "config", "show", "depth=0")
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_unknown_key_exit_code():
    r = run_cli("config", "show", "lr_typo=3")
    assert r.returncode == 2 and "unknown config key 'lr_typo'" in r.stderr


def test_config_keys_lists_every_section():
    r = run_cli("config", "keys", "--json")
    keys = {row["key"] for row in json.loads(r.stdout)}
    assert {"model.depth", "rl.beta", "sft.lr", "telemetry.wandb", "seed"} <= keys


# --- what the auditor found: messages, signals, streams, exit codes ------------------------------------------


def run_piped(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """The CLI as in `nanorl ... | cat`: no COLUMNS, stdout and stderr pipes (an env value None unsets it)."""
    e = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    e.update(env or {})
    e = {k: v for k, v in e.items() if v is not None}
    return subprocess.run(
        [sys.executable, "-m", "nanorl", *args], capture_output=True, text=True, env=e, timeout=120, **kw
    )


def test_markup_in_user_text_is_printed_as_it_is(tmp_path):
    # rich markup in an override, a value, a recipe's error: printed literally, never a MarkupError traceback
    r = run_cli("config", "show", "[/b]=1")
    assert r.returncode == 2 and "error: unknown config key '[/b]'" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("config", "show", "rl.rewards=x[/y]:z")
    assert r.returncode == 2 and "rl.rewards[x[/y]]" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("config", "show", "rl.rewards=a:b")
    assert r.returncode == 2 and "invalid value for rl.rewards[a]:" in r.stderr
    recipe = tmp_path / "bad.toml"
    recipe.write_text("model = 3\n")
    r = run_cli("config", "show", "--config", str(recipe))
    assert r.returncode == 2 and f"{recipe}: [model] must be a table" in r.stderr
    r = run_cli("config", "show", "--data-dir", "/d/[/x]/[bold]")  # a table cell
    assert r.returncode == 0 and "'/d/[/x]/[bold]'" in r.stdout, r.stderr


def test_an_error_that_cannot_be_printed_still_prints_one_line(monkeypatch, capsys):
    import pytest

    import nanorl.cli as cli

    def broken(message, hint=None):
        raise RuntimeError("the printer broke")

    monkeypatch.setattr(cli, "print_error", broken)
    with pytest.raises(SystemExit) as e:
        cli.main(["config", "show", "depth=0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: invalid value for model.depth" in err and "Traceback" not in err


def test_debug_is_global_anywhere_before_double_dash():
    r = run_cli("config", "show", "--debug", "depth=0")
    assert r.returncode == 2 and "Traceback" in r.stderr and "No such option" not in r.stderr
    r = run_cli("config", "show", "depth=0", "--debug")
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_ctrl_c_says_interrupted_and_exits_130(tmp_path):
    import signal
    import time

    env = {**os.environ, "NANORL_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "nanorl", "pipeline", "--task", "arith", "--preset", "tiny", "steps=100000"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in p.stderr:  # training has started: the long-running part
            if line.startswith("base"):
                break
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    # 130; or killed by SIGINT, which a shell also reports as 130: CPython ends that way whatever main() exits with
    # when the interrupt landed inside an exec() of a string (dataclasses does those while torch imports)
    assert p.returncode in (130, -signal.SIGINT), err
    assert (
        "error: interrupted" in err
        and "hint: run the same command again: a stage resumes from its last checkpoint" in err
    )
    assert "Traceback" not in err


def test_json_stays_pure_with_wandb_on(tmp_path):
    import pytest

    pytest.importorskip("wandb")
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_SILENT": None}
    r = run_piped("pipeline", "--task", "arith", "--preset", "tiny", "telemetry.wandb=true", "--only", "tokenizer",
                  "--json", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokenizer"]["vocab_size"] > 256  # nothing but the JSON on stdout
    assert "wandb sync" in r.stderr  # wandb's closing lines: on stderr


def test_file_system_errors_name_the_path_exit_2_without_calling_it_a_bug(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    r = run_cli("pipeline", "--task", "arith", "--preset", "tiny", "--only", "tokenizer",
                env={"NANORL_HOME": str(afile)})  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert f"error: Not a directory: {afile}/runs" in r.stderr and f"NANORL_HOME={afile}" in r.stderr
    assert "a bug in nanorl" not in r.stderr and "Traceback" not in r.stderr
    r = run_cli("data", "download", "fineweb", "--shards", "1", "--dir", str(afile), "--url", "http://127.0.0.1:9")
    assert r.returncode == 2 and f"File exists: {afile}" in r.stderr
    assert "fineweb 0/" not in r.stdout + r.stderr  # the folder is checked before the progress bar
    r = run_cli("tokenizer", "train", "--vocab-size", "300", "--out", str(afile / "tok"))
    assert r.returncode == 2 and f"{afile}" in r.stderr and "a bug in nanorl" not in r.stderr
    r = run_cli("--debug", "tokenizer", "train", "--vocab-size", "300", "--out", str(afile / "tok"))
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_fineweb_download_offline_fails_at_once_saying_how_to_go_on(tmp_path):
    # the tests' HF_HUB_OFFLINE=1 (conftest): no 30 s of retries against the hub, one error and a way on
    r = run_cli("data", "download", "fineweb", "--shards", "2", env={"NANORL_FINEWEB_URL": ""})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "error: downloading 2 FineWeb-EDU shards from the Hugging Face hub needs the network" in r.stderr
    assert "hint: unset HF_HUB_OFFLINE to download" in r.stderr and "data/fineweb" in r.stderr


def test_piped_output_is_wide_enough_not_to_cut_tables(tmp_path):
    # `nanorl ... | cat`: rich would squeeze to 80 columns and cut cells ("generat…"); a table that fits is whole
    long_dir = "/data/" + "x" * 100
    r = run_piped("config", "show", "--data-dir", long_dir)
    assert r.returncode == 0 and f"'{long_dir}'" in r.stdout and "…" not in r.stdout
    # COLUMNS still rules when set
    r = run_piped("config", "show", "--data-dir", long_dir, env={"COLUMNS": "80"})
    assert f"'{long_dir}'" not in r.stdout


def test_piped_help_and_usage_errors_are_as_wide_as_the_rest():
    # typer lays out --help and its usage box at its own width (80 in a pipe, cutting option help to "s3://…"):
    # piped, they are ui.PIPE_WIDTH wide like every other output; COLUMNS and typer's TERMINAL_WIDTH still rule
    def widest(text: str) -> int:
        return max(len(line) for line in text.splitlines())

    env = {"TERMINAL_WIDTH": None}
    r = run_piped("eval", "--help", env=env)
    assert r.returncode == 0 and widest(r.stdout) == 200, r.stdout
    assert "or s3://bucket/prefix/RUN[/STAGE]. [required]" in r.stdout  # one line, whole
    r = run_piped("data", env=env)  # a group given no command shows its help
    assert widest(r.stdout) == 200, r.stdout
    r = run_piped("eval", env=env)  # no --checkpoint: typer's usage box, on stderr
    assert r.returncode == 2 and "Missing option '--checkpoint'" in r.stderr and widest(r.stderr) == 200, r.stderr
    assert widest(run_piped("eval", "--help", env={**env, "COLUMNS": "80"}).stdout) == 80
    assert widest(run_piped("eval", "--help", env={"TERMINAL_WIDTH": "120"}).stdout) == 120


def test_piped_stage_lines_are_as_wide_as_the_rest(tmp_path):
    # the stages' own lines (batch layouts, warnings, what a rerun changed) go through the pipeline's console:
    # piped, they are laid out 200 columns wide like every other output, not split at 80
    args = ("pipeline", "--preset", "tiny", "--only", "tokenizer", "tokenizer.train_chars=20000")
    assert run_piped(*args).returncode == 0
    changed = ("base.steps=3", "mid.steps=3", "sft.steps=3", "rl.steps=3", "eval.max_examples=3", "eval.samples=0")
    r = run_piped(*args, *changed)
    assert r.returncode == 0, r.stderr
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("run.toml:")]
    assert line.rstrip().endswith("eval.samples 4 -> 0"), r.stderr


def test_cloud_launch_without_setup_hints_at_one_that_installs_the_default_commands_task():
    # the default command trains `--task aqua`, which the nanorl distribution alone does not have: the example
    # --setup installs the aqua plugin beside it (a subdirectory of the same repository)
    r = run_cli("cloud", "launch", "gpu_1x_h100_pcie", "--yes", env={"NANORL_CLOUD_SETUP": ""})
    assert r.returncode == 2 and "--setup (or NANORL_CLOUD_SETUP)" in r.stderr
    assert "nanorl@COMMIT#subdirectory=plugins/aqua" in r.stderr


def test_warnings_are_one_yellow_line_each(tmp_path):
    data = tmp_path / "aqua"
    data.mkdir()
    good = {"question": "1+1?", "options": ["A)1", "B)2", "C)3", "D)4", "E)5"], "rationale": "1+1=2", "correct": "B"}
    (data / "dev.json").write_text(json.dumps(good) + "\n" + "{not json\n" + json.dumps(good) + "\n")
    r = run_piped("data", "show", "--task", "aqua", "--data-dir", str(data), "-n", "1", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["size"] == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("warning: ") and "skipped 1 of 3 rows (line 2: not valid JSON" in line
    assert "BadRowsWarning" not in r.stderr


def test_a_warning_message_shows_once(monkeypatch, capsys):
    import warnings

    import nanorl.cli as cli

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored afterwards
    cli.state["debug"] = False
    cli._show_warnings_as_lines()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("rows [/b] skipped", UserWarning, stacklevel=1)
        warnings.warn("rows [/b] skipped", UserWarning, stacklevel=1)
    assert capsys.readouterr().err.splitlines() == ["warning: rows [/b] skipped"]


def test_out_of_range_options_are_usage_errors_before_any_output(tmp_path):
    r = run_cli("data", "show", "-n", "-1")
    assert r.returncode == 2 and r.stdout == "" and "-n" in r.stderr
    for args in (["--start", "-1"], ["--shards", "0"], ["--workers", "0"]):
        r = run_cli("data", "download", "fineweb", *args, "--dir", str(tmp_path / "fw"), "--url", "http://127.0.0.1:9")
        assert r.returncode == 2 and r.stdout == "" and "fineweb 0/" not in r.stderr, args
    assert not (tmp_path / "fw").exists()


def test_config_errors_have_hints():
    r = run_cli("config", "show", "--preset", "nope")
    assert r.returncode == 2 and "unknown preset 'nope'" in r.stderr and "hint: --preset tiny" in r.stderr
    r = run_cli("config", "show", "--name", "a/b")
    assert r.returncode == 2 and "invalid run name 'a/b'" in r.stderr and "hint: pick another with --name" in r.stderr


# --- nanorl cloud against the fake Lambda API -----------------------------------------------------------------


def _fake_lambda():
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "lambda" / "tests"))
    from fake_lambda import FakeLambda

    return FakeLambda()


def test_cloud_launch_says_which_machine_is_billed_when_waiting_fails():
    with _fake_lambda() as fake:
        env = {"LAMBDA_API_KEY": "test-key", "LAMBDA_API_URL": fake.url, "NANORL_CLOUD_POLL_S": "0.01"}
        launch = ["cloud", "launch", "gpu_1x_a10", "--setup", "true", "--yes"]
        r = run_piped(*launch, "--timeout-min", "-1", "--json", env=env)
        assert r.returncode == 2 and "--timeout-min -1" in r.stderr and r.stdout == ""
        assert fake.instances == {}  # refused before renting
        fake.boot_polls = 10**6  # it never comes up: the wait times out
        r = run_piped(*launch, "--timeout-min", "0.001", "--json", env=env)
        assert r.returncode == 1 and "is still booting after" in r.stderr
        inst = json.loads(r.stdout)  # a script learns the billed machine's id
        assert inst["id"] in fake.instances and fake.instances[inst["id"]]["status"] == "booting"
        r = run_piped(*launch, "--timeout-min", "0.001", env=env)
        (second,) = set(fake.instances) - {inst["id"]}
        assert r.returncode == 1 and f"nanorl cloud terminate {second}" in r.stderr
        # copy-paste commands are not split in a pipe
        fake.boot_polls = 0
        r = run_piped(*launch, "--name", "n" * 60, env=env)
        assert r.returncode == 0, r.stderr
        (third,) = set(fake.instances) - {inst["id"], second}
        follow = f"follow: nanorl cloud logs {third}    end (billing stops): nanorl cloud terminate {third}"
        assert follow in r.stdout.splitlines()


def test_cloud_bad_ids_and_dead_machines_are_clear(tmp_path):
    ssh = tmp_path / "ssh"
    ssh.write_text(f"#!/bin/sh\ntouch {tmp_path / 'ssh-ran'}\nexit 255\n")
    ssh.chmod(0o755)
    with _fake_lambda() as fake:
        env = {"LAMBDA_API_KEY": "test-key", "LAMBDA_API_URL": fake.url, "NANORL_CLOUD_POLL_S": "0.01",
               "NANORL_SSH": str(ssh)}  # fmt: skip
        r = run_piped("cloud", "status", "nosuch", env=env)
        assert r.returncode == 2 and "does not exist" in r.stderr and "nanorl cloud list" in r.stderr
        r = run_piped("cloud", "launch", "gpu_1x_a10", "--setup", "true", "--yes", "-e", "NOPE_VAR_XYZ", env=env)
        assert r.returncode == 2 and "no such variable in this shell" in r.stderr and fake.instances == {}
        r = run_piped("cloud", "launch", "gpu_1x_a10", "--setup", "true", "--yes", "--json", env=env)
        iid = json.loads(r.stdout)["id"]
        assert run_piped("cloud", "terminate", iid, "--yes", env=env).returncode == 0
        r = run_piped("cloud", "logs", iid, env=env)
        assert r.returncode == 1 and f"instance {iid} is terminated" in r.stderr
        assert not (tmp_path / "ssh-ran").exists()  # no ssh to a machine that is gone
        r = run_piped("cloud", "types", env={**env, "NANORL_PLUGINS": ""})
        assert r.returncode == 2 and "NANORL_PLUGINS='' leaves out the installed plugins" in r.stderr
        assert "pip install" not in r.stderr


def test_stage_start_line_prints_a_description_as_it_is_and_steps_in_english(capsys):
    from nanorl.api import StageInfo
    from nanorl.builtin.sinks import ConsoleSink

    sink = ConsoleSink()  # stderr is not a terminal: plain lines
    sink.on_stage_start(StageInfo("r", "/tmp/r", "tokenizer", "t", {}, 1, "a BPE on data/[ab]*.txt"))
    sink.on_stage_start(StageInfo("r", "/tmp/r", "base", "t", {}, 1))
    sink.on_stage_start(StageInfo("r", "/tmp/r", "rl", "t", {}, 30))
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["tokenizer: a BPE on data/[ab]*.txt", "base: 1 step", "rl: 30 steps"]


def test_wandb_sink_logs_each_model_and_mode_of_an_eval_under_its_own_keys():
    """The eval stage reports the sft and rl models in two modes each: four results whose accuracies must not
    overwrite one another in wandb's summary."""
    from nanorl.api import EvalResult
    from nanorl.builtin.sinks import WandbSink

    logged = []
    sink = WandbSink()
    sink.run = type("Run", (), {"log": lambda self, d: logged.append(d)})()  # a started run, without wandb
    for stage, mode, acc in (("sft", "generative", 0.5), ("rl", "generative", 0.75), ("rl", "categorical", 0.25)):
        sink.on_eval(EvalResult("arith", "dev", {"accuracy": acc, "model_stage": stage, "mode": mode}))
    sink.on_eval(EvalResult("plug", "test", {"accuracy": 1.0}))  # a plugin's result without stage or mode
    assert logged == [
        {"eval/arith-dev/sft/generative/accuracy": 0.5},
        {"eval/arith-dev/rl/generative/accuracy": 0.75},
        {"eval/arith-dev/rl/categorical/accuracy": 0.25},
        {"eval/plug-test/accuracy": 1.0},
    ]


def test_progress_lines_print_a_plugin_task_name_as_it_is(capsys):
    from nanorl.api import EvalResult, StageInfo
    from nanorl.builtin.sinks import ConsoleSink

    sink = ConsoleSink()
    sink.on_stage_start(StageInfo("r", "/tmp/r", "eval", "t[/x]", {}, 1))  # stderr is not a terminal: plain lines
    sink.on_step("eval", 1, {"loss": 1.0})
    sink.on_eval(EvalResult("t[/x]", "dev", {"accuracy": 0.5, "n": 2, "model_stage": "sft", "mode": "generative"}))
    assert "eval t[/x] dev (sft, generative): accuracy 0.500, n=2" in capsys.readouterr().err


def test_a_sigterm_and_a_full_disk_are_one_line_each_saying_what_to_do(monkeypatch, capsys, tmp_path):
    from nanorl.cli import _os_error, main
    from nanorl.stages import runner
    from nanorl.stages.common import Stopped
    from nanorl.telemetry import Telemetry

    def preempted(*args, **kwargs):
        raise Stopped("stopped by SIGTERM: base saved its checkpoint at step 3", 143)

    monkeypatch.setattr(runner, "run_pipeline", preempted)
    with pytest.raises(SystemExit) as stop:
        main(["pipeline", "--preset", "tiny"])
    err = capsys.readouterr().err
    assert stop.value.code == 143 and "Traceback" not in err
    assert "stopped by SIGTERM: base saved its checkpoint at step 3" in err and "resumes" in err

    # a disk that fills under metrics.jsonl: the error names the file (a write's own error names none)
    bus = Telemetry(tmp_path, hooks=[])

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    bus._fh = Full()
    with pytest.raises(OSError) as full:
        bus.log("base", 1, {"loss": 1.0})
    message, hint, code = _os_error(full.value)
    assert message == f"No space left on device: {tmp_path / 'metrics.jsonl'}" and code == 1
    assert hint.startswith(f"free space on that disk ({tmp_path})") and "resumes from its last checkpoint" in hint


def test_tokenizer_train_in_a_pipe_starts_with_its_result_not_an_empty_line(tmp_path):
    """rich's progress bar, in a pipe, drew nothing but left an empty first line on stdout."""
    r = run_piped("tokenizer", "train", "--vocab-size", "300", "--max-chars", "20000", "--out", str(tmp_path / "tok"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("tokenizer saved to "), r.stdout[:80]


def test_bad_input_to_tokenizer_eval_and_config_is_exit_2_with_a_hint(tmp_path, monkeypatch):
    """Each of these printed an error without a hint, or exited 1 for what the user gave (a run that does not
    exist, a file for a folder), or, for a run whose task plugin is not installed, named only the task."""
    from nanorl.config import resolve, write_run_config

    home = tmp_path / "home"
    env = {"NANORL_HOME": str(home)}
    cases = [
        (("tokenizer", "info", "--run", "nosuch"), "no run named 'nosuch'"),
        (("tokenizer", "info", "--dir", __file__), "is a file, not a tokenizer's folder"),
        (("tokenizer", "encode", "x", "--run", "a/b"), "invalid run name 'a/b'"),
        (("eval", "--checkpoint", "x", "--mode", "gen"), "--mode 'gen'"),
        (("eval", "--checkpoint", "x", "--samples", "-1"), "--samples -1"),
        (("eval", "--checkpoint", "x", "--sample-temperature", "0"), "--sample-temperature 0.0"),
        (("config", "show", "--json", "--toml"), "give --json or --toml, not both"),
        (("config", "show", "--config", str(tmp_path / "nope.toml")), "config file not found"),
        (("data", "show", "--split", "nope"), "unknown split 'nope' for task arith"),
        (("config", "show", "--preset", "tiny", "--depth", "8"), "--preset tiny and --depth 8: give one"),
    ]
    # a run of a task whose plugin is left out (NANORL_PLUGINS empty: the built-ins only)
    monkeypatch.setenv("NANORL_HOME", str(home))
    write_run_config(resolve(overrides=["name=elsewhere", "task=aqua"]))
    (home / "runs" / "elsewhere" / "sft").mkdir()
    (home / "runs" / "elsewhere" / "sft" / "state.json").write_text("{}")
    cases.append((("eval", "--checkpoint", "elsewhere/sft"), "run elsewhere was trained on task 'aqua', and unknown"))
    for args, message in cases:
        r = run_cli(*args, env={**env, "NANORL_PLUGINS": ""})
        lines = r.stderr.splitlines()
        assert r.returncode == 2 and message in lines[0] and lines[1].startswith("hint: "), (args, r.stderr)
        assert len(lines) == 2 and r.stdout == "", (args, r.stdout, r.stderr)
