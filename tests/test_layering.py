"""The packages' dependency order, read from every module's imports (lazy ones included):

    model/  <-  runtime/  <-  export/
                   ^
                service/  (export/ only where it writes an export: service/model_cache.py)

mad/ (the command line and benchmarks) sits on top and may import them all."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "runtime", "export", "service", "mad")
# package -> the project packages its modules may import
ALLOWED = {
    "model": {"model"},
    "runtime": {"model", "runtime"},
    "export": {"model", "runtime", "export"},
    "service": {"model", "runtime", "service"},
    "mad": set(PACKAGES),
}
# module -> the extra packages it may import, and why
EXCEPTIONS = {
    "service/model_cache.py": {"export"},  # exports the checkpoint into the cache at start-up
}


def imported_packages(path: Path) -> set[str]:
    """The project packages `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # A relative import stays inside its own package.
            names = [node.module or ""] if node.level == 0 else []
        else:
            continue
        found |= {name.split(".")[0] for name in names} & set(PACKAGES)
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_against_the_order(package):
    assert modules(package), f"{package}/ has no modules"
    wrong = {}
    for path in modules(package):
        name = path.relative_to(ROOT).as_posix()
        extra = imported_packages(path) - ALLOWED[package] - EXCEPTIONS.get(name, set())
        if extra:
            wrong[name] = sorted(extra)
    assert not wrong, f"imports against model <- runtime <- export (service: no export): {wrong}"


def test_the_exceptions_are_still_needed():
    """An exception nobody uses any more goes, so the rule tightens by itself."""
    for name, extra in EXCEPTIONS.items():
        path = ROOT / name
        assert path.is_file(), f"{name} is gone: drop its exception"
        assert extra <= imported_packages(path), f"{name} no longer imports {extra}"


def test_the_parser_sees_lazy_and_from_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "import model.config\nfrom . import sibling\n"
        "def f():\n    from export.onnx_export import export_onnx\n"
        "    import runtime\n"
    )
    assert imported_packages(source) == {"model", "export", "runtime"}
