"""Plugin discovery through real entry points: throwaway distributions written on the fly to a temp sys.path."""

from __future__ import annotations

import json
import os
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
