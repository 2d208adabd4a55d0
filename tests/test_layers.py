"""The package's layers: imports point down only, no circles, no imports hidden in functions.

The layers, lowest first (a module may import its own layer and those below it):

0. the pure core: ``options``, ``schedules``, ``timesteps``, ``diffusion``, ``losses``,
   ``samplers``, and the private ``_runtime`` (the jits' compiler options);
1. ``models`` and ``data``;
2. ``plots`` (pictures of arrays and of the core);
3. ``train``;
4. ``evaluation`` and ``convert`` (the importers and exporter of published weights);
5. the command lines: every ``__main__`` module.

The checker reads the source with :mod:`ast`, so it runs on the real package and on small
made-up packages that show it fails on an upward import, a circle and a hidden import.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import diffusion_jax

PACKAGE = "diffusion_jax"
CLI = 5
LAYERS = {
    "": 0,  # the package's own __init__ (it exports the core's jit)
    "options": 0,
    "schedules": 0,
    "timesteps": 0,
    "diffusion": 0,
    "losses": 0,
    "samplers": 0,
    "_runtime": 0,
    "models": 1,
    "data": 1,
    "plots": 2,
    "train": 3,
    "evaluation": 4,
    "convert": 4,
}
CORE_NAMES = ("options", "schedules", "timesteps", "diffusion", "losses", "samplers", "_runtime")


def read_package(root: pathlib.Path) -> dict[str, str]:
    """``{dotted module name: source}`` of every module under ``root`` (a package folder)."""
    sources = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        sources[".".join(parts)] = path.read_text()
    return sources


def layer_of(module: str) -> int:
    """The layer of a dotted module name of the package."""
    parts = module.split(".")
    if parts[-1] == "__main__":
        return CLI
    top = parts[1] if len(parts) > 1 else ""
    if top not in LAYERS:
        raise AssertionError(f"{module} is in no layer: add its top-level name to LAYERS.")
    return LAYERS[top]


def _imports(module: str, source: str, modules: set[str]) -> list[tuple[str, bool, int]]:
    """``(imported module, inside a function, line)`` for each import of the package."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == PACKAGE:
                        found.append((alias.name, in_function, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    is_package = f"{module}.__init__" in modules or any(
                        m.startswith(module + ".") for m in modules
                    )
                    anchor = module.split(".")
                    anchor = anchor if is_package else anchor[:-1]
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                if base.split(".")[0] != PACKAGE:
                    continue
                for alias in child.names:
                    # `from pkg import sub` imports the submodule, not the package.
                    target = f"{base}.{alias.name}"
                    found.append((target if target in modules else base, in_function, child.lineno))
            visit(child, nested)

    visit(ast.parse(source), False)
    return found


def check_layers(sources: dict[str, str]) -> list[str]:
    """Every violation in a package's sources: upward imports, imports inside functions,
    and import circles (each a message naming the modules)."""
    modules = set(sources)
    problems = []
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, source in sources.items():
        for target, in_function, line in _imports(module, source, modules):
            if in_function:
                problems.append(f"{module}:{line} imports {target} inside a function")
            if target == module:
                continue
            if layer_of(target) > layer_of(module):
                problems.append(
                    f"{module}:{line} imports {target} from a higher layer "
                    f"({layer_of(module)} -> {layer_of(target)})"
                )
            if target in graph and not in_function:
                graph[module].add(target)
    problems.extend(f"import circle: {' -> '.join(cycle)}" for cycle in _cycles(graph))
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected group of modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append([*sorted(group), sorted(group)[0]])

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return groups


def test_the_package_respects_its_layers():
    root = pathlib.Path(diffusion_jax.__file__).parent
    sources = read_package(root)
    assert len(sources) > 30  # the whole package was read
    assert check_layers(sources) == []


def test_the_core_imports_neither_flax_nor_the_layers_above():
    root = pathlib.Path(diffusion_jax.__file__).parent
    sources = read_package(root)
    core = [m for m in sources if m != PACKAGE and m.split(".")[1] in CORE_NAMES]
    assert {"diffusion_jax.samplers", "diffusion_jax.losses"} <= set(core)
    for module in core:
        tree = ast.parse(sources[module])
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.split(".")[0] in ("flax", "optax", "orbax")], module


def _made_up(**modules: str) -> dict[str, str]:
    return {f"{PACKAGE}.{name}" if name else PACKAGE: text for name, text in modules.items()}


@pytest.mark.parametrize(
    "sources, expected",
    [
        pytest.param(
            _made_up(losses="from diffusion_jax.train import loop\n", **{"train.loop": ""}),
            "diffusion_jax.losses:1 imports diffusion_jax.train.loop from a higher layer (0 -> 3)",
            id="core-imports-trainer",
        ),
        pytest.param(
            _made_up(**{"train.a": "from diffusion_jax.evaluation import b\n", "evaluation.b": ""}),
            "imports diffusion_jax.evaluation.b from a higher layer (3 -> 4)",
            id="trainer-imports-evaluation",
        ),
        pytest.param(
            _made_up(
                **{
                    "plots.a": "from diffusion_jax.plots import b\n",
                    "plots.b": "import diffusion_jax.plots.a\n",
                }
            ),
            "import circle: diffusion_jax.plots.a -> diffusion_jax.plots.b -> "
            "diffusion_jax.plots.a",
            id="circle",
        ),
        pytest.param(
            _made_up(
                **{"train.a": "def f():\n    from diffusion_jax.train import b\n", "train.b": ""}
            ),
            "diffusion_jax.train.a:2 imports diffusion_jax.train.b inside a function",
            id="hidden-in-function",
        ),
        pytest.param(
            _made_up(**{"data.a": "from . import b\n", "data.b": "from .a import x\n"}),
            "import circle: diffusion_jax.data.a -> diffusion_jax.data.b -> diffusion_jax.data.a",
            id="relative-circle",
        ),
    ],
)
def test_the_checker_catches_each_violation(sources, expected):
    problems = check_layers(sources)
    assert any(expected in problem for problem in problems), problems


def test_the_checker_accepts_downward_imports_and_clis():
    sources = _made_up(
        **{
            "": "from diffusion_jax import options\n",
            "options": "",
            "train.loop": "from diffusion_jax import options\n",
            "evaluation.runs": "from diffusion_jax.train import loop\n",
            "plots.__main__": "from diffusion_jax.evaluation import runs\n",
        }
    )
    assert check_layers(sources) == []


def test_an_unknown_top_level_module_is_named():
    with pytest.raises(AssertionError, match=r"diffusion_jax\.extras is in no layer"):
        check_layers(_made_up(extras="", options="from diffusion_jax import extras\n"))
