"""Plugin discovery through real entry points: throwaway distributions written on the fly to a temp sys.path."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nanorl.api import NanorlError
from nanorl.plugins import Plugins


def make_dist(root: Path, dist: str, module: str, source: str, ep_name: str | None = None) -> None:
    """Write an installed-looking distribution: a module plus NAME-VER.dist-info with an entry_points.txt."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-0.3.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3.1\n")
    (info / "entry_points.txt").write_text(f"[nanorl]\n{ep_name or module} = {module}\n")


GOOD = """
    from nanorl.api import Example, Reward, Task, TelemetryHook, hookimpl

    class Echo(Task):
        name = "echo"
        def load(self, split, data_dir=None):
            return [Example(id="0", question="say 1", answer="1")]
        def prompt(self, ex):
            return [{"role": "user", "content": ex.question}]
        def target(self, ex):
            return ex.answer
        def extract(self, completion):
            return completion.strip() or None

    class Counter(TelemetryHook):
        name = "echo.counter"

    @hookimpl
    def register_tasks(register):
        register(Echo())

    @hookimpl
    def register_rewards(register):
        register(Reward("echo.exact", lambda ex, completion, answer: float(answer == ex.answer)))

    @hookimpl
    def register_telemetry(register):
        register(Counter())

    @hookimpl
    def register_commands(app):
        @app.command("echo-hello")
        def hello():
            print("hello from echo")
"""

BROKEN_IMPORT = """
    raise ImportError("this plugin needs a library that is not installed")
"""

RAISES_IN_HOOK = """
    from nanorl.api import hookimpl

    @hookimpl
    def register_tasks(register):
        raise RuntimeError("boom in register_tasks")
"""

DUPLICATE = """
    from nanorl.api import Reward, hookimpl

    @hookimpl
    def register_rewards(register):
        register(Reward("echo.exact", lambda ex, completion, answer: 0.0))
"""

WRONG_TYPE = """
    from nanorl.api import hookimpl

    @hookimpl
    def register_tasks(register):
        register("not a task")
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    return root


def test_entry_point_plugin_is_discovered_and_registers(site):
    make_dist(site, "nanorl-plugin-echo", "nanorl_echo", GOOD, ep_name="echo")
    plugins = Plugins()
    info = plugins.infos["echo"]
    assert info.errors == []
    assert info.source == "nanorl-plugin-echo" and info.version == "0.3.1"
    assert info.registered == {"task": ["echo"], "reward": ["echo.exact"], "telemetry": ["echo.counter"]}
    assert {"register_tasks", "register_rewards", "register_commands"} <= set(info.hooks)
    task = plugins.task("echo")
    ex = task.load("dev")[0]
    assert task.is_correct(ex, task.extract(" 1 ")) and not task.is_correct(ex, task.extract("2"))
    assert plugins.reward("echo.exact")(ex, "1", "1") == 1.0
    assert "echo.counter" in [h.name for h in plugins.telemetry_hooks()]


def test_broken_plugins_are_reported_and_skipped(site):
    make_dist(site, "nanorl-plugin-echo", "nanorl_echo", GOOD, ep_name="echo")
    make_dist(site, "nanorl-plugin-broken", "nanorl_broken", BROKEN_IMPORT, ep_name="broken")
    make_dist(site, "nanorl-plugin-raiser", "nanorl_raiser", RAISES_IN_HOOK, ep_name="raiser")
    plugins = Plugins()
    errors = dict(plugins.errors())
    assert "ImportError" in errors["broken"] and "not installed" in errors["broken"]
    assert "register_tasks raised RuntimeError: boom" in errors["raiser"]
    assert plugins.infos["broken"].traceback  # kept for `plugins list --traceback`
    assert plugins.task("echo").name == "echo"  # the good plugin is untouched


def test_two_plugins_registering_one_name_is_an_error_naming_both(site):
    make_dist(site, "nanorl-plugin-echo", "nanorl_echo", GOOD, ep_name="echo")
    make_dist(site, "nanorl-plugin-zdup", "nanorl_zdup", DUPLICATE, ep_name="zdup")
    plugins = Plugins()
    assert "already registered by plugin 'echo'" in " ".join(plugins.infos["zdup"].errors)
    with pytest.raises(NanorlError, match="echo, zdup"):
        plugins.reward("echo.exact")


def test_registering_the_wrong_type_is_reported(site):
    make_dist(site, "nanorl-plugin-wrong", "nanorl_wrong", WRONG_TYPE, ep_name="wrong")
    plugins = Plugins()
    assert "expects Task objects, got str" in " ".join(plugins.infos["wrong"].errors)


def test_selection_filters_entry_points(site):
    make_dist(site, "nanorl-plugin-echo", "nanorl_echo", GOOD, ep_name="echo")
    make_dist(site, "nanorl-plugin-broken", "nanorl_broken", BROKEN_IMPORT, ep_name="broken")
    only_echo = Plugins(selection=["echo"])
    assert "echo" in only_echo.infos and "broken" not in only_echo.infos
    none = Plugins(selection=[])
    assert not any(i.source != "builtin" for i in none.infos.values())
    with pytest.raises(NanorlError, match="unknown task 'echo'"):
        none.task("echo")


def test_repository_plugins_are_installed_as_distributions():
    plugins = Plugins()
    for name, dist in [
        ("aqua", "nanorl-plugin-aqua"),
        ("gsm8k", "nanorl-plugin-gsm8k"),
        ("lambda", "nanorl-plugin-lambda"),
    ]:
        assert plugins.infos[name].source == dist
        assert plugins.infos[name].errors == []
        assert plugins.infos[name].warnings == []  # they import nothing from nanorl but nanorl.api


# --- through the real CLI, in a subprocess (what a user sees) ----------------------------------------------


def run_cli(*args: str, site: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    if site is not None:
        e["PYTHONPATH"] = os.pathsep.join([str(site), e.get("PYTHONPATH", "")])
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "nanorl", *args], capture_output=True, text=True, env=e, timeout=60)


def test_cli_lists_plugins_and_keeps_working_with_a_broken_one(site):
    make_dist(site, "nanorl-plugin-echo", "nanorl_echo", GOOD, ep_name="echo")
    make_dist(site, "nanorl-plugin-broken", "nanorl_broken", BROKEN_IMPORT, ep_name="broken")
    r = run_cli("plugins", "list", "--json", site=site)
    assert r.returncode == 0, r.stderr
    by_name = {p["name"]: p for p in json.loads(r.stdout)["plugins"]}
    assert by_name["echo"]["registered"]["task"] == ["echo"]
    assert "not installed" in by_name["broken"]["errors"][0]
    # other commands still answer, and the plugin's own command works
    assert run_cli("config", "show", "--json", site=site).returncode == 0
    r = run_cli("echo-hello", site=site)
    assert r.returncode == 0 and "hello from echo" in r.stdout
    # the table view names the failure too
    r = run_cli("plugins", "list", site=site)
    assert r.returncode == 0 and "broken" in r.stdout and "failed to load" in r.stdout


def test_cli_respects_nanorl_plugins(site):
    make_dist(site, "nanorl-plugin-echo", "nanorl_echo", GOOD, ep_name="echo")
    r = run_cli("plugins", "list", "--json", site=site, env={"NANORL_PLUGINS": ""})
    names = {p["name"] for p in json.loads(r.stdout)["plugins"] if p["source"] != "builtin"}
    assert names == set()
    r = run_cli("plugins", "list", "--json", site=site, env={"NANORL_PLUGINS": "echo,aqua"})
    names = {p["name"] for p in json.loads(r.stdout)["plugins"] if p["source"] != "builtin"}
    assert names == {"echo", "aqua"}


def test_the_example_in_docs_plugins_md_works(site):
    """The complete minimal plugin in docs/plugins.md is real code: load it and check it round-trips."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    after = doc.split("`src/nanorl_parity/plugin.py`:", 1)[1]
    source = after.split("```python\n", 1)[1].split("```", 1)[0]
    make_dist(site, "nanorl-plugin-parity", "nanorl_parity_plugin", source, ep_name="parity")
    plugins = Plugins()
    assert plugins.infos["parity"].errors == []
    task = plugins.task("parity")
    dev = task.load("dev")
    assert len(dev) == 200 and {ex.answer for ex in dev} == {"even", "odd"}
    for ex in dev[:20]:
        answer = task.extract(task.target(ex))
        assert task.is_correct(ex, answer)
        assert plugins.reward("parity.correct")(ex, task.target(ex), answer) == 1.0
    with pytest.raises(NanorlError, match="no split"):
        task.load("validation")
    # the pipeline's default data.corpus=task pretrains on the task's own text: the example must have some
    for split in ("train", "dev"):
        first = next(iter(task.corpus(split)))
        assert "Final Answer:" in first
    assert plugins.infos["parity"].warnings == []


MARKUP_ERROR = """
    from nanorl.api import hookimpl

    @hookimpl
    def register_tasks(register):
        raise RuntimeError("closing [/bad] tag and a [bold] one")
"""


TAKES_BUILTIN_NAMES = """
    import typer
    from nanorl.api import hookimpl

    @hookimpl
    def register_commands(app):
        @app.command("eval")
        def fake_eval():
            print("the plugin's eval")

        app.add_typer(typer.Typer(), name="config")

        @app.command()
        def taker_hello():
            print("hello from taker")
"""


SAME_COMMAND = """
    from nanorl.api import hookimpl

    @hookimpl
    def register_commands(app):
        @app.command("taker-hello")
        def again():
            print("the second one")
"""


def test_a_plugin_error_with_markup_is_listed_as_it_is(site):
    make_dist(site, "nanorl-plugin-marky", "nanorl_marky", MARKUP_ERROR, ep_name="marky")
    r = run_cli("plugins", "list", site=site, env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert "register_tasks raised RuntimeError: closing [/bad] tag and a [bold] one" in r.stdout


def test_a_plugin_cannot_replace_a_command(site):
    import typer

    make_dist(site, "nanorl-plugin-taker", "nanorl_taker", TAKES_BUILTIN_NAMES, ep_name="taker")
    make_dist(site, "nanorl-plugin-zsame", "nanorl_zsame", SAME_COMMAND, ep_name="zsame")
    app = typer.Typer()

    @app.command("eval")
    def builtin_eval():
        pass

    app.add_typer(typer.Typer(), name="config")
    plugins = Plugins()
    plugins.add_commands(app)
    names = sorted(c.name or c.callback.__name__ for c in [*app.registered_commands, *app.registered_groups])
    assert names == ["config", "eval", "taker_hello"]
    assert [c.callback for c in app.registered_commands if c.name == "eval"] == [builtin_eval]  # the built-in stays
    assert len(app.registered_groups) == 1
    errors = plugins.infos["taker"].errors
    assert "command 'eval' is already a built-in command; this one is skipped" in errors
    assert "command 'config' is already a built-in command; this one is skipped" in errors
    assert plugins.infos["taker"].registered == {"command": ["taker-hello"]}
    assert plugins.infos["zsame"].errors == [
        "command 'taker-hello' is already plugin 'taker''s command; this one is skipped"
    ]
    # through the CLI: the built-in eval answers, and plugins list names the refusal
    r = run_cli("eval", "--checkpoint", "no-such-run", site=site)
    assert "the plugin's eval" not in r.stdout and "No such option" not in r.stderr and "no-such-run" in r.stderr
    r = run_cli("plugins", "list", "--json", site=site)
    by_name = {p["name"]: p for p in json.loads(r.stdout)["plugins"]}
    assert any("'eval' is already a built-in command" in e for e in by_name["taker"]["errors"])
    r = run_cli("taker-hello", site=site)
    assert r.returncode == 0 and "hello from taker" in r.stdout


def test_nanorl_plugins_naming_no_installed_plugin_is_warned_about(site):
    make_dist(site, "nanorl-plugin-echo", "nanorl_echo", GOOD, ep_name="echo")
    with pytest.warns(UserWarning, match=r"NANORL_PLUGINS names no installed plugin 'nosuch' \(installed: .*echo"):
        plugins = Plugins(selection=["nosuch", "echo"])
    assert "echo" in plugins.infos and "aqua" in plugins.excluded
    r = run_cli("plugins", "list", "--json", site=site, env={"NANORL_PLUGINS": "nosuch,echo"})
    assert r.returncode == 0 and json.loads(r.stdout)["plugins"]
    assert r.stderr.startswith("warning: NANORL_PLUGINS names no installed plugin 'nosuch'")


# --- mistakes a plugin author makes: each one line, naming the plugin and what to do ----------------------------

HOOK_MISTAKES = {
    "typo": """
        from nanorl.api import hookimpl

        @hookimpl
        def register_task(register):
            pass
    """,
    "unmarked": """
        def register_tasks(register):
            pass
    """,
    "argname": """
        from nanorl.api import hookimpl

        @hookimpl
        def register_tasks(reg):
            pass
    """,
}


def test_hook_mistakes_are_reported_in_one_line(site):
    for name, source in HOOK_MISTAKES.items():
        make_dist(site, f"nanorl-plugin-{name}", f"nanorl_{name}", source, ep_name=name)
    plugins = Plugins()
    errors = {name: plugins.infos[name].errors for name in HOOK_MISTAKES}
    assert all(len(e) == 1 and "\n" not in e[0] for e in errors.values()), errors
    assert "'register_task' is no nanorl hook; did you mean 'register_tasks'?" in errors["typo"][0]
    assert "register_tasks is not decorated with @hookimpl" in errors["unmarked"][0]
    assert "register_tasks(reg) asks for 'reg'" in errors["argname"][0]
    assert "register_tasks(register)" in errors["argname"][0]


BROKEN_OBJECTS = """
    from nanorl.api import Example, Reward, Task, hookimpl

    class NoExtract(Task):
        name = "noextract"
        def load(self, split, data_dir=None):
            return [Example(id="0", question="q", answer="a")]
        def prompt(self, ex):
            return [{"role": "user", "content": ex.question}]
        def target(self, ex):
            return ex.answer

    @hookimpl
    def register_tasks(register):
        register(NoExtract())

    @hookimpl
    def register_rewards(register):
        register(Reward("objs.twoargs", lambda ex, completion: 1.0))
        register(Reward("objs.fine", lambda ex, completion, answer=None: 1.0))
"""


def test_a_task_or_reward_that_cannot_work_is_refused_at_registration(site):
    make_dist(site, "nanorl-plugin-objs", "nanorl_objs", BROKEN_OBJECTS, ep_name="objs")
    plugins = Plugins()
    errors = plugins.infos["objs"].errors
    assert "task 'noextract' is not registered: it does not define extract()" in errors[0]
    assert "reward 'objs.twoargs' is not registered: its fn(ex, completion) cannot be called" in errors[1]
    assert plugins.infos["objs"].registered == {"reward": ["objs.fine"]}
    # using the name says which plugin and why, not "unknown task"
    with pytest.raises(NanorlError, match="task 'noextract' of plugin 'objs' was not registered: .*extract") as e:
        plugins.task("noextract")
    assert "NANORL_PLUGINS" in e.value.hint
    with pytest.raises(NanorlError, match="reward 'objs.twoargs' of plugin 'objs'"):
        plugins.reward("objs.twoargs")


TAKES_ARITH = """
    from nanorl.api import Example, Task, hookimpl

    class Mine(Task):
        name = "arith"
        def load(self, split, data_dir=None):
            return []
        def prompt(self, ex):
            return []
        def target(self, ex):
            return ""
        def extract(self, completion):
            return None

    @hookimpl
    def register_tasks(register):
        register(Mine())
"""


def test_a_plugin_cannot_take_or_block_a_builtin_name(site):
    make_dist(site, "nanorl-plugin-arithtaker", "nanorl_arithtaker", TAKES_ARITH, ep_name="arithtaker")
    plugins = Plugins()
    assert plugins.task("arith").__module__ == "nanorl.builtin.arith"  # `--task arith` keeps working
    errors = plugins.infos["arithtaker"].errors
    assert errors == ["task 'arith' is a built-in name and stays the built-in's: rename yours"]


REWARDS = """
    from nanorl.api import Reward, hookimpl

    @hookimpl
    def register_rewards(register):
        register(Reward("rw.none", lambda ex, completion, answer: None))
        register(Reward("rw.text", lambda ex, completion, answer: "1"))
        register(Reward("rw.nan", lambda ex, completion, answer: float("nan")))
        register(Reward("rw.raises", lambda ex, completion, answer: {}["missing"]))
        register(Reward("rw.bool", lambda ex, completion, answer: answer == ex.answer))
"""


def test_a_reward_that_fails_or_returns_no_number_is_a_one_line_error_naming_it(site):
    import torch

    from nanorl.api import Example, Reward

    make_dist(site, "nanorl-plugin-rw", "nanorl_rw", REWARDS, ep_name="rw")
    plugins = Plugins()
    ex = Example(id="0", question="q", answer="a")
    for name, what in [
        ("none", "returned None"),
        ("text", "returned '1' \\(str\\)"),
        ("nan", "returned nan"),
        ("raises", "raised KeyError: 'missing'"),
    ]:
        with pytest.raises(NanorlError) as e:
            plugins.reward(f"rw.{name}")(ex, "text", "a")
        assert re.fullmatch(f"reward 'rw.{name}' \\(plugin 'rw'\\) {what}", e.value.message), e.value.message
    assert plugins.reward("rw.bool")(ex, "text", "a") == 1.0
    assert Reward("t", lambda ex, completion, answer: torch.tensor(0.5))(ex, "", None) == 0.5


def test_an_unknown_name_points_at_the_plugins_that_failed_to_load(site):
    make_dist(site, "nanorl-plugin-broken", "nanorl_broken", BROKEN_IMPORT, ep_name="broken")
    with pytest.raises(NanorlError, match="unknown task 'mine'") as e:
        Plugins().task("mine")
    assert "plugin 'broken' failed to load" in e.value.hint


INTERNAL_IMPORT = """
    from nanorl.api import hookimpl
    from nanorl.tokenizer import Tokenizer  # not part of the plugin API
    from nanorl import config

    @hookimpl
    def register_tasks(register):
        pass
"""


def test_a_plugin_importing_nanorl_outside_nanorl_api_is_warned_about(site):
    make_dist(site, "nanorl-plugin-echo", "nanorl_echo", GOOD, ep_name="echo")
    make_dist(site, "nanorl-plugin-inside", "nanorl_inside", INTERNAL_IMPORT, ep_name="inside")
    plugins = Plugins()
    warned = plugins.infos["inside"].warnings
    assert [w.split(" (")[0] for w in warned] == ["imports nanorl.tokenizer", "imports nanorl.config"]
    assert "nanorl_inside.py line 3" in warned[0] and "only nanorl.api" in warned[0]
    assert plugins.infos["inside"].errors == [] and plugins.infos["inside"].hooks == ["register_tasks"]
    assert plugins.infos["echo"].warnings == []
    r = run_cli("plugins", "list", site=site, env={"COLUMNS": "300"})
    assert r.returncode == 0 and "! inside (nanorl-plugin-inside): imports nanorl.tokenizer" in r.stdout


def test_a_cloud_backend_missing_a_method_says_which():
    from nanorl.api import CloudBackend

    class Half(CloudBackend):
        name = "half"

    with pytest.raises(NanorlError, match=r"the 'half' cloud backend does not implement logs\(\)"):
        Half().logs("i-1")


def test_debug_shows_a_plugins_traceback(site):
    make_dist(site, "nanorl-plugin-broken", "nanorl_broken", BROKEN_IMPORT, ep_name="broken")
    assert "Traceback" not in run_cli("plugins", "list", site=site).stdout
    r = run_cli("--debug", "plugins", "list", site=site)
    assert r.returncode == 0 and "Traceback" in r.stdout and "not installed" in r.stdout
