"""The house order: the library never imports the commands; the public surface is reachable."""

import ast
from pathlib import Path

import momres

SRC = Path(momres.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the momres modules ``path`` imports (relative imports resolved)."""
    package = ["momres", *path.relative_to(SRC).parent.parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return {name for name in names if name.split(".")[0] == "momres"}


def test_the_library_imports_nothing_from_the_commands():
    library = [p for p in SRC.rglob("*.py")
               if "cli" not in p.relative_to(SRC).parts and p.name != "__main__.py"]
    assert len(library) > 10
    for path in library:
        upward = {m for m in imported_modules(path) if m.startswith("momres.cli")}
        assert not upward, f"{path.relative_to(SRC)} imports {upward}"


def test_commands_do_not_import_each_other():
    commands = {"train", "demo", "bench", "plan", "experiments"}
    for path in (SRC / "cli").rglob("*.py"):
        mine = path.relative_to(SRC / "cli").parts[0].removesuffix(".py")
        others = {m for m in imported_modules(path) if m.split(".")[:2] == ["momres", "cli"]
                  and len(m.split(".")) > 2 and m.split(".")[2] in commands - {mine}}
        assert not others, f"cli/{path.relative_to(SRC / 'cli')} imports {others}"


def test_public_names():
    assert set(momres.__all__) >= {"MomentumNet", "ReversibleStage", "to_momentum",
                                   "activation_memory", "memory", "models", "debug", "plan",
                                   "Strategy"}
    assert momres.memory.activation_memory is momres.activation_memory
    assert callable(momres.memory.peak_bytes) and callable(momres.models.create_model)
