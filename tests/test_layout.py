"""The tree's shape is a contract: the passes stand alone (they never import the front end in
vpsurgery/), and each stage of the flow has its folder."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):  # function-local imports count too
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_passes_never_import_the_front_end():
    offending = [(str(p.relative_to(ROOT)), m) for p in (ROOT / "passes").rglob("*.py")
                 for m in imported_modules(p)
                 if (m == "vpsurgery" or m.startswith("vpsurgery.")) and not m.startswith("vpsurgery.passes")]
    assert not offending, f"passes/ must stand alone (relative imports only): {offending}"


def test_the_flow_has_a_folder_per_stage():
    for stage in ("capture", "analyse", "gate", "shrink"):
        assert (ROOT / "passes" / stage / "__init__.py").is_file(), stage
    assert (ROOT / "vpsurgery" / "train" / "__init__.py").is_file()
