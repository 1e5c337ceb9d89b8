"""The import graph of rlhf_exp has no cycle, and the stages never reach up into the
command-line layer. Every module is parsed (not imported); an edge is any import of another
rlhf_exp module, at module level or inside a function, including the package __init__ that
importing a submodule runs first."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "rlhf_exp"
# the modules that settle the command line, launch ranks and run the app
COMMAND_LINE = ("rlhf_exp.cli", "rlhf_exp.command.settle", "rlhf_exp.command.launch",
                "rlhf_exp.command.preflight", "rlhf_exp.command.usage",
                "rlhf_exp.command.resume_argv", "rlhf_exp.command.objective", "rlhf_exp.__main__")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")
            if "conf" not in p.relative_to(PACKAGE).parts[:1]
            and "examples" not in p.relative_to(PACKAGE).parts}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The rlhf_exp modules `name` imports (`from a import b` counts a.b when b is a module)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_pkg else name.split(".")[:-1]
                here = here[:len(here) - node.level + 1]
                base = ".".join([*here, base] if base else here)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            # the module itself if known, and every package above it (their __init__ runs)
            # that is not a package of `name` itself (that one is importing already)
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                mod = ".".join(parts[:i])
                if mod in known and mod != name and not name.startswith(mod + "."):
                    out.add(mod)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path, or None (iterative DFS, white/grey/black)."""
    state: dict[str, int] = {}
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph.get(child, ())))))
    return None


def test_the_graph_sees_the_imports():
    """The walk finds what is there (function-level imports included), so the checks below
    can fail."""
    graph = import_graph()
    assert "rlhf_exp.registry" in graph["rlhf_exp.config.choices"]
    assert "rlhf_exp.stages.eval" in graph["rlhf_exp.command.preflight"]  # inside a function
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_stages_do_not_import_the_command_line_layer():
    graph = import_graph()
    upward = {(m, t) for m, targets in graph.items() if m.startswith("rlhf_exp.stages")
              for t in targets if t in COMMAND_LINE}
    assert not upward, f"stages import the command-line layer: {sorted(upward)}"


# the layers below the command line; tasks/build_instructions.py is a command of its own (it
# composes a model preset), so it may use the command layer
LOWER = ("rlhf_exp.training", "rlhf_exp.rl", "rlhf_exp.modeling", "rlhf_exp.data",
         "rlhf_exp.tasks", "rlhf_exp.config", "rlhf_exp.registry", "rlhf_exp.errors")
TOOLS = ("rlhf_exp.tasks.build_instructions",)


def test_lower_layers_do_not_import_the_command_layer_or_the_stages():
    """training/, rl/, modeling/, data/, tasks/ and config/ never reach up into command/, the
    app or a stage runner (function-level imports included)."""
    graph = import_graph()
    upward = {(m, t) for m, targets in graph.items()
              if m.startswith(LOWER) and m not in TOOLS for t in targets
              if t.startswith(("rlhf_exp.command", "rlhf_exp.stages")) or t == "rlhf_exp.cli"}
    assert not upward, f"a lower layer imports the command layer or a stage: {sorted(upward)}"


def test_the_registry_and_config_stay_torch_free():
    """`--help` and `--cfg job` load them: no torch (nor any rlhf_exp module that imports it)
    at their module level."""
    for name in ("rlhf_exp.registry", "rlhf_exp.config.choices", "rlhf_exp.config.schema",
                 "rlhf_exp.config.validate", "rlhf_exp.config.stage_checks"):
        tree = ast.parse(_modules()[name].read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names} | \
            {n.module for n in top if isinstance(n, ast.ImportFrom)}
        assert not {"torch", "deepspeed", "transformers"} & names, name
