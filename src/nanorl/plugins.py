"""Finding and loading plugins: the built-ins, then every installed distribution's `nanorl` entry points.

A plugin that fails to import, or raises inside a hook, is recorded (name, error) and skipped: `nanorl plugins
list` shows it, and every other command keeps working. Two plugins registering one name is an error that names
both; the first keeps the name, and using it is refused until one of them is removed.

`NANORL_PLUGINS=a,b` loads only the entry points named a and b; `NANORL_PLUGINS=` (empty) loads none.
Built-ins always load. A name there that no installed plugin has is warned about (a typo loads nothing).

A plugin's `register_commands` may add commands, never replace one: a name the app already has (`eval`, another
plugin's command) is refused, recorded as that plugin's error, and the command that was there stays.

What a plugin registers is checked when it registers, so that a mistake is reported by `nanorl plugins list` (and
when the name is used) rather than deep in a run: a hook name with a typo, a hook function without `@hookimpl`, a
hook argument named differently from the hookspec, a task without `load`/`prompt`/`target`/`extract`, a reward
whose function cannot be called as `fn(example, completion, answer)`, and a name a built-in has (the built-in
keeps it). A plugin whose own modules import from nanorl anything but `nanorl.api` gets a warning.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import os
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from nanorl import hookspecs
from nanorl.api import CloudBackend, NanorlError, Reward, Task, TelemetryHook
from nanorl.builtin import BUILTINS

GROUP = "nanorl"

# kind -> (hook name, the class a registered object must be an instance of)
KINDS: dict[str, tuple[str, type]] = {
    "task": ("register_tasks", Task),
    "reward": ("register_rewards", Reward),
    "telemetry": ("register_telemetry", TelemetryHook),
    "backend": ("register_backends", CloudBackend),
}


@dataclass
class PluginInfo:
    name: str
    source: str  # "builtin" or the distribution name
    version: str
    module: str
    hooks: list[str] = field(default_factory=list)
    registered: dict[str, list[str]] = field(default_factory=dict)  # kind -> names
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # problems that do not stop it (imports outside nanorl.api)
    traceback: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "version": self.version,
            "module": self.module,
            "hooks": self.hooks,
            "registered": self.registered,
            "errors": self.errors,
            "warnings": self.warnings,
        }


class Plugins:
    """The loaded plugins and what they registered. Use `get_plugins()` for the process-wide instance."""

    def __init__(self, selection: list[str] | None = None, entry_points: list[Any] | None = None):
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.registry: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
        self.owner: dict[tuple[str, str], str] = {}  # (kind, name) -> plugin that registered it
        self.conflicts: dict[tuple[str, str], list[str]] = {}
        self.refused: dict[tuple[str, str], tuple[str, str]] = {}  # (kind, name) -> (plugin, why it was refused)
        self.selection = selection
        self.excluded: list[str] = []  # installed entry points that the selection leaves out
        self._commands_added = False

        for name, module in BUILTINS:
            self._load(name, "builtin", _core_version(), lambda m=module: importlib.import_module(m), module)
        eps = list(metadata.entry_points(group=GROUP)) if entry_points is None else entry_points
        for ep in sorted(eps, key=lambda e: e.name):
            if selection is not None and ep.name not in selection:
                self.excluded.append(ep.name)
                continue
            dist = getattr(ep, "dist", None)
            source = dist.metadata["Name"] if dist is not None else "?"
            version = dist.version if dist is not None else "?"
            self._load(ep.name, source, version, ep.load, ep.value)
        for kind, (hook, _) in KINDS.items():
            self._call(kind, hook)
        if selection is not None:
            known = {ep.name for ep in eps} | {name for name, _ in BUILTINS}
            unknown = [s for s in selection if s not in known]
            if unknown:
                have = ", ".join(sorted({ep.name for ep in eps})) or "none"
                warnings.warn(
                    f"NANORL_PLUGINS names no installed plugin {', '.join(map(repr, unknown))} (installed: {have})",
                    UserWarning,
                    stacklevel=2,
                )

    # -- loading --------------------------------------------------------------------------------------------
    def _load(self, name: str, source: str, version: str, load, module: str) -> None:
        info = PluginInfo(name=name, source=source, version=version, module=module)
        self.infos[name] = info
        if self.pm.has_plugin(name):
            info.errors.append(f"a plugin named {name!r} is already loaded; this one is skipped")
            return
        try:
            obj = load()
        except Exception as e:  # a broken plugin must never take the CLI down
            info.errors.append(f"failed to load: {type(e).__name__}: {_one_line(e)}")
            info.traceback = traceback.format_exc()
            return
        problems, fatal = self._check_hooks(obj)
        info.errors += problems
        if fatal:  # pluggy would refuse it too, with a message several lines long
            return
        try:
            self.pm.register(obj, name=name)
        except Exception as e:
            info.errors.append(f"failed to load: {type(e).__name__}: {_one_line(e)}")
            info.traceback = traceback.format_exc()
            return
        info.hooks = sorted(impl_name for impl_name in _hook_names(self.pm, name))
        if source != "builtin":
            info.warnings += _outside_api_imports(module)

    def _check_hooks(self, obj) -> tuple[list[str], bool]:
        """What is wrong with a plugin's hook functions, in one line each, and whether it cannot be registered:
        an unknown hook name (a typo pluggy ignores), a hook function not marked `@hookimpl` (ignored too), an
        argument the hookspec does not pass (pluggy refuses the plugin)."""
        specs = {name: getattr(self.pm.hook, name).spec.argnames for name in _spec_names()}
        problems, fatal = [], False
        for attr in dir(obj):
            if attr.startswith("__"):
                continue
            try:
                opts = self.pm.parse_hookimpl_opts(obj, attr)
            except Exception:
                continue
            if opts is None:
                if attr in specs and callable(getattr(obj, attr, None)):
                    problems.append(
                        f"{attr} is not decorated with @hookimpl, so it is never called: "
                        "add `from nanorl.api import hookimpl` and `@hookimpl` above it"
                    )
                continue
            if attr not in specs:
                close = difflib.get_close_matches(attr, specs, n=1)
                did = f"did you mean {close[0]!r}? " if close else ""
                problems.append(f"@hookimpl {attr!r} is no nanorl hook; {did}the hooks are {', '.join(specs)}")
                continue
            try:
                params = list(inspect.signature(getattr(obj, attr)).parameters)
            except (TypeError, ValueError):
                continue
            extra = [p for p in params if p not in specs[attr]]
            if extra:
                fatal = True
                want = ", ".join(specs[attr])
                problems.append(
                    f"hook {attr}({', '.join(params)}) asks for {', '.join(map(repr, extra))}, which the hook does "
                    f"not pass: name its argument as the hookspec does: {attr}({want})"
                )
        return problems, fatal

    def _call(self, kind: str, hook: str) -> None:
        """Call one register_* hook plugin by plugin, so that each registration is attributed and isolated."""
        expected = KINDS[kind][1]
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            plugin = impl.plugin_name
            info = self.infos[plugin]

            def register(obj, _plugin=plugin, _info=info):
                if not isinstance(obj, expected):
                    raise TypeError(f"{hook} expects {expected.__name__} objects, got {type(obj).__name__}")
                key = getattr(obj, "name", "")
                if not key:
                    raise ValueError(f"a {kind} registered by {_plugin!r} has no name")
                problem = _invalid(kind, obj)
                if problem:
                    self.refused.setdefault((kind, key), (_plugin, problem))
                    _info.errors.append(f"{kind} {key!r} is not registered: {problem}")
                    return
                owner = self.owner.get((kind, key))
                if owner is not None and self.infos[owner].source == "builtin":
                    # a built-in's name stays the built-in's: installing a plugin never breaks `--task arith`
                    _info.errors.append(f"{kind} {key!r} is a built-in name and stays the built-in's: rename yours")
                    return
                if owner is not None:
                    self.conflicts.setdefault((kind, key), [owner]).append(_plugin)
                    _info.errors.append(
                        f"{kind} {key!r} is already registered by plugin {owner!r}: rename yours (neither is usable "
                        "while both are installed)"
                    )
                    return
                self.owner[(kind, key)] = _plugin
                if kind == "reward" and not obj.plugin:
                    obj.plugin = _plugin  # named in the reward's errors
                self.registry[kind][key] = obj
                _info.registered.setdefault(kind, []).append(key)

            try:
                impl.function(register)
            except Exception as e:
                info.errors.append(f"{hook} raised {type(e).__name__}: {_one_line(e)}")
                info.traceback = traceback.format_exc()

    # -- lookups --------------------------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> Any:
        conflict = self.conflicts.get((kind, name))
        if conflict:
            raise NanorlError(
                f"{kind} {name!r} is registered by more than one plugin: {', '.join(conflict)}",
                hint="uninstall one of them, or load only one with NANORL_PLUGINS=...",
            )
        try:
            return self.registry[kind][name]
        except KeyError:
            pass
        if (kind, name) in self.refused:
            plugin, why = self.refused[(kind, name)]
            raise NanorlError(
                f"{kind} {name!r} of plugin {plugin!r} was not registered: {why}",
                hint=f"fix the plugin, or leave it out with NANORL_PLUGINS=... (`nanorl plugins list` shows {plugin}'s"
                " errors)",
            )
        known = ", ".join(sorted(self.registry[kind])) or "none"
        failed = [n for n, i in self.infos.items() if any(e.startswith("failed to load") for e in i.errors)]
        hint = "`nanorl plugins list` shows what each installed plugin provides"
        if failed:
            hint = (
                f"plugin{'s' * (len(failed) > 1)} {', '.join(map(repr, failed))} failed to load; {hint}, and why "
                "(--traceback: where)"
            )
        raise NanorlError(f"unknown {kind} {name!r} (available: {known})", hint=hint, exit_code=2)

    def task(self, name: str) -> Task:
        return self.get("task", name)

    def reward(self, name: str) -> Reward:
        return self.get("reward", name)

    def backend(self, name: str) -> CloudBackend:
        return self.get("backend", name)

    def telemetry_hooks(self) -> list[TelemetryHook]:
        return list(self.registry["telemetry"].values())

    def add_commands(self, app) -> None:
        """Let plugins add CLI commands; a plugin that fails here is recorded like any other failure."""
        if self._commands_added:
            return
        self._commands_added = True
        owner = {name: "nanorl" for name in _command_names(app)}
        for impl in self.pm.hook.register_commands.get_hookimpls():
            info = self.infos[impl.plugin_name]
            n_commands, n_groups = len(app.registered_commands), len(app.registered_groups)
            try:
                impl.function(app)
            except Exception as e:
                info.errors.append(f"register_commands raised {type(e).__name__}: {e}")
                info.traceback = traceback.format_exc()
            # what this plugin added: a name already taken is refused, the command that has it stays
            for entries in (app.registered_commands, app.registered_groups):
                start = n_commands if entries is app.registered_commands else n_groups
                added, kept = entries[start:], []
                for entry in added:
                    name = _entry_name(entry)
                    if name in owner:
                        by = "a built-in command" if owner[name] == "nanorl" else f"plugin {owner[name]!r}'s command"
                        info.errors.append(f"command {name!r} is already {by}; this one is skipped")
                        continue
                    owner[name] = impl.plugin_name
                    info.registered.setdefault("command", []).append(name)
                    kept.append(entry)
                entries[start:] = kept

    def errors(self) -> list[tuple[str, str]]:
        return [(name, err) for name, info in self.infos.items() for err in info.errors]


# the methods a registered object must define itself (the base class's raise NotImplementedError)
REQUIRED: dict[str, tuple[str, ...]] = {"task": ("load", "prompt", "target", "extract")}


def _invalid(kind: str, obj: Any) -> str | None:
    """Why a registered object cannot work (checked at registration, not at first use deep in a run), or None."""
    base = KINDS[kind][1]
    missing = [m for m in REQUIRED.get(kind, ()) if getattr(type(obj), m, None) is getattr(base, m)]
    if missing:
        need = ", ".join(f"{m}()" for m in REQUIRED[kind])
        return f"it does not define {', '.join(f'{m}()' for m in missing)} (a {base.__name__} defines {need})"
    if kind == "reward":
        fn = obj.fn
        if not callable(fn):
            return f"its fn is a {type(fn).__name__}, not a function"
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):  # a builtin without a signature: trusted
            return None
        try:
            sig.bind(None, "", None)
        except TypeError:
            return f"its fn{sig} cannot be called as fn(example, completion, answer)"
    return None


def _one_line(e: BaseException) -> str:
    """An exception's message on one line (pluggy's validation errors take three)."""
    return " ".join(str(e).split())


def _spec_names() -> list[str]:
    return [n for n in dir(hookspecs) if n.startswith("register_") and callable(getattr(hookspecs, n))]


ALLOWED_IMPORTS = {"nanorl.api", "nanorl.__version__"}
MAX_SCANNED = 200  # files of a plugin's package read for its imports (a plugin is small; nanorl --help stays fast)


def _outside_api_imports(module: str) -> list[str]:
    """One warning per nanorl module other than nanorl.api that the plugin's own package imports (its source read,
    not run: `from nanorl.api import X` stays fine even where X lives in another module)."""
    name = module.split(":")[0].strip()
    mod = sys.modules.get(name)
    if mod is not None and not hasattr(mod, "__path__") and "." in name:  # a module in a package: the package
        mod = sys.modules.get(name.rsplit(".", 1)[0])
    paths = list(getattr(mod, "__path__", None) or []) if mod is not None else []
    files = [f for p in paths for f in sorted(_py_files(p))][:MAX_SCANNED]
    if not files and getattr(mod, "__file__", None):
        files = [mod.__file__]
    found: dict[str, str] = {}
    for path in files:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            if "nanorl" not in text:
                continue
            tree = ast.parse(text)
        except (OSError, SyntaxError, ValueError):
            continue
        base = os.path.basename(path)
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == "nanorl":
                    names = [f"nanorl.{a.name}" for a in node.names]
                else:
                    names = [node.module]
            for n in names:
                if n.startswith("nanorl.") and n not in ALLOWED_IMPORTS and n not in found:
                    found[n] = f"{base} line {node.lineno}"
    return [
        f"imports {n} ({where}): a plugin imports only nanorl.api, the one stable surface; use what it exports, "
        "or ask for what is missing to be added there"
        for n, where in found.items()
    ]


def _py_files(root: str):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__pycache__"))]
        yield from (os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))


def _entry_name(entry) -> str:
    """The name a Typer command (CommandInfo) or group (TyperInfo) is invoked by, as typer derives it."""
    name = getattr(entry, "name", None)
    if not name and getattr(entry, "typer_instance", None) is not None:
        name = getattr(entry.typer_instance.info, "name", None)
        name = name if isinstance(name, str) else None
    if not name:
        callback = getattr(entry, "callback", None)
        name = getattr(callback, "__name__", "") if callback is not None else ""
    return name.lower().replace("_", "-") if name else ""


def _command_names(app) -> set[str]:
    return {_entry_name(e) for e in [*app.registered_commands, *app.registered_groups]} - {""}


def _hook_names(pm: pluggy.PluginManager, plugin_name: str) -> list[str]:
    callers = pm.get_hookcallers(pm.get_plugin(plugin_name)) or []
    return [c.name for c in callers]


def _core_version() -> str:
    from nanorl import __version__

    return __version__


def selection_from_env() -> list[str] | None:
    """`NANORL_PLUGINS` unset: all plugins; set: the comma-separated names (empty: none but the built-ins)."""
    raw = os.environ.get("NANORL_PLUGINS")
    if raw is None:
        return None
    return [s.strip() for s in raw.split(",") if s.strip()]


_PLUGINS: Plugins | None = None


def get_plugins() -> Plugins:
    global _PLUGINS
    if _PLUGINS is None:
        _PLUGINS = Plugins(selection_from_env())
    return _PLUGINS


def reset_plugins() -> None:
    """Forget the loaded plugins (tests, or after installing one in-process)."""
    global _PLUGINS
    _PLUGINS = None
