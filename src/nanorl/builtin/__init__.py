"""Built-in plugins. They register through exactly the same hooks as external ones.

Each entry is (plugin name, module path); the module holds `@hookimpl` functions.
"""

BUILTINS: list[tuple[str, str]] = [
    ("arith", "nanorl.builtin.arith"),
    ("sinks", "nanorl.builtin.sinks"),
]
