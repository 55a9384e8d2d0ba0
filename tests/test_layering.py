"""The import contract of ``src/medctl``: layers only point down (DESIGN.md, "Layout").

Every import in every module counts, function-level ones included (a lazy import is still a dependency).
Each top-level module or package of ``medctl`` has a rank; a module may import its own package and
packages of a lower or equal rank, never a higher one, and the package graph has no cycles (so two
packages of the same rank never import each other, directly or round about); the stages import no other
stage. Library code (everything below the CLI) never imports typer or rich's console, and the libraries
take config sections, never the whole ``Config``.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "medctl"

RANKS = {
    # foundations: the error family, atomic writes, progress on stderr, the version
    "__init__": 0,
    "devices": 0,
    "errors": 0,
    "io": 0,
    "progress": 0,
    # configuration, run directories, storage
    "config": 1,
    "runs": 1,
    "storage": 1,
    # libraries (preprocess, the stage, lives in data/ with the cache it makes)
    "data": 2,
    "models": 2,
    "analysis": 2,
    "training": 2,
    # experiment tracking (MLflow, W&B) of run folders; the fit loop knows it only as a ScalarSink
    "tracking": 2,
    # stages: one per command
    "pretrain": 3,
    "finetune": 3,
    "evaluate": 3,
    "saliency": 3,
    # a stage made of stages
    "sweep": 4,
    # what runs several stages or checks a config against all of them
    "demo": 5,
    "demo_saliency": 5,
    "demo_eeg": 5,
    "preflight": 5,
    # the command line
    "cli": 6,
    "__main__": 7,
}
CLI_LAYER = {"cli", "__main__"}
# progress.py makes the one stderr Console its progress bars draw on (rich.progress needs a Console)
CONSOLE_ALLOWED = {"progress"}


def package_of(path: Path) -> str:
    """``src/medctl/finetune/run.py`` -> ``finetune``; ``src/medctl/runs.py`` -> ``runs``."""
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) for every import in the file, at any depth, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = ["medctl", *path.relative_to(SRC).with_suffix("").parts]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's package upwards
                base = here[: len(here) - node.level]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # `from medctl import finetune` names a package, not a symbol of medctl/__init__
            if module == "medctl":
                found += [(node.lineno, f"medctl.{alias.name}") for alias in node.names if alias.name in RANKS]
    return found


def medctl_target(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "medctl":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def package_edges() -> dict[tuple[str, str], list[str]]:
    """(importer, imported) package -> where ("file:line"), over every module of src/medctl."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        source = package_of(path)
        for line, module in imported_modules(path):
            target = medctl_target(module)
            if target is not None and target != source:
                edges.setdefault((source, target), []).append(f"{path.relative_to(SRC.parent)}:{line}")
    return edges


def test_every_module_has_a_rank():
    unranked = sorted({package_of(p) for p in SRC.rglob("*.py")} - RANKS.keys())
    assert not unranked, f"give these top-level modules/packages a rank in tests/test_layering.py: {unranked}"


def test_no_package_imports_one_above_it():
    upward = [
        f"{where[0]} ({source}, rank {RANKS[source]}) imports medctl.{target} (rank {RANKS[target]})"
        for (source, target), where in sorted(package_edges().items())
        if source in RANKS and target in RANKS and RANKS[target] > RANKS[source]
    ]
    assert not upward, "imports pointing up a layer:\n" + "\n".join(upward)


def test_stages_do_not_import_each_other():
    """What two stages share (predictions, the split-manifest hash, a checkpoint's config) lives below both."""
    stages = {name for name, rank in RANKS.items() if rank == 3}
    sideways = [
        f"{where[0]} (stage {source}) imports the stage medctl.{target}"
        for (source, target), where in sorted(package_edges().items())
        if source in stages and target in stages
    ]
    assert not sideways, "stages importing stages; move the shared code down a layer:\n" + "\n".join(sideways)


def test_no_package_cycles():
    edges = package_edges()
    graph: dict[str, set[str]] = {}
    for source, target in edges:
        graph.setdefault(source, set()).add(target)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo += graph.get(node, ())
        return False

    cycles = [
        f"{where[0]} ({source}) imports medctl.{target}, which imports {source} back (directly or round about)"
        for (source, target), where in sorted(edges.items())
        if reaches(target, source)
    ]
    assert not cycles, "package cycles:\n" + "\n".join(cycles)


def test_library_imports_neither_typer_nor_rich_console():
    found = [
        f"{path.relative_to(SRC.parent)}:{line} imports {module}"
        for path in sorted(SRC.rglob("*.py"))
        if package_of(path) not in CLI_LAYER
        for line, module in imported_modules(path)
        if module.split(".")[0] == "typer"
        or (module.startswith("rich.console") and package_of(path) not in CONSOLE_ALLOWED)
    ]
    assert not found, "library code imports the CLI's tools (typer, rich.console):\n" + "\n".join(found)


def test_the_contract_sees_function_level_imports():
    """The scanner itself: cli/check.py imports medctl.preflight only inside a function, and that counts."""
    assert ("cli", "preflight") in package_edges()


def test_libraries_take_config_sections_not_the_whole_config():
    """STYLE: data, models, training and analysis get the values or the section they need, never ``Config``."""
    libraries = {name for name, rank in RANKS.items() if rank == 2}
    found = [
        f"{path.relative_to(SRC.parent)}:{node.lineno} imports the whole Config"
        for path in sorted(SRC.rglob("*.py"))
        if package_of(path) in libraries
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom)
        and (node.module or "").split(".")[:2] == ["medctl", "config"]  # the package or one of its modules
        and any(alias.name == "Config" for alias in node.names)
    ]
    assert not found, "\n".join(found)


# ------------------------------------------------------------------------------------------------ sizes
# Issue 28: a stage's functions read top to bottom in one screenful or two, and no module grows past what a
# reader holds in mind. The function limit holds in the stage packages (libraries hold long loops, e.g. fit);
# the module limit everywhere in src/medctl.
MAX_FUNCTION_LINES = 100
MAX_MODULE_LINES = 500
STAGE_PACKAGES = {"pretrain", "finetune", "evaluate", "saliency", "sweep", "demo", "demo_saliency", "demo_eeg", "cli"}
# What may stay longer, each with why.
LONG_FUNCTIONS = {
    # 100 of its lines declare its 11 options (a Typer command is its options plus one call into the stage)
    "cli/saliency.py:saliency_command": "option declarations: a Typer command is its options plus one call",
}
LONG_MODULES = {
    # timm's layout, one file per model family: blocks, the model, weight adaptation, the builders
    "models/encoders/vit3d.py": "one model family per file (STYLE.md, from timm)",
}


@functools.cache  # one scan for the three tests
def _sizes() -> tuple[dict[str, int], dict[str, int]]:
    """(module -> lines, "module:function" -> lines in a stage package), paths relative to src/medctl."""
    modules, functions = {}, {}
    for path in sorted(SRC.rglob("*.py")):
        name = path.relative_to(SRC).as_posix()
        text = path.read_text()
        modules[name] = len(text.splitlines())
        if package_of(path) not in STAGE_PACKAGES:
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                functions[f"{name}:{node.name}"] = node.end_lineno - node.lineno + 1
    return modules, functions


def test_no_function_over_100_lines_in_a_stage_package():
    _, functions = _sizes()
    long = [f"{name}: {n} lines" for name, n in sorted(functions.items())
            if n > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS]  # fmt: skip
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines; move their parts to their layers:\n" + "\n".join(long)


def test_no_module_over_500_lines():
    modules, _ = _sizes()
    long = [f"{name}: {n} lines" for name, n in sorted(modules.items())
            if n > MAX_MODULE_LINES and name not in LONG_MODULES]  # fmt: skip
    assert not long, f"modules over {MAX_MODULE_LINES} lines; split them:\n" + "\n".join(long)


def test_the_size_allow_lists_name_only_what_is_still_long():
    """An entry whose file or function shrank (or moved) goes, so the lists never excuse new growth."""
    modules, functions = _sizes()
    stale = [name for name in LONG_MODULES if modules.get(name, 0) <= MAX_MODULE_LINES]
    stale += [name for name in LONG_FUNCTIONS if functions.get(name, 0) <= MAX_FUNCTION_LINES]
    assert not stale, f"remove these from the allow-lists in tests/test_layering.py: {stale}"
