"""The architecture contract (pyproject.toml, [tool.importlinter]): one-way layers, no cycles, no Streamlit in the
library, the app's pages on the public API only; the public API itself (attribution/__init__.py); a clean lint."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"]


def run_lint(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LINT, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_the_import_contract_holds():
    out = run_lint()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "4 kept, 0 broken" in out.stdout, out.stdout[-3000:]


def test_the_checker_sees_the_code(tmp_path):
    """A contract that inverts two real layers must break: the check reads the actual imports."""
    cfg = tmp_path / "inverted.ini"
    cfg.write_text("[importlinter]\nroot_packages =\n    attribution\n\n[importlinter:contract:x]\nname = inverted\n"
                   "type = layers\nlayers =\n    attribution.kernel\n    attribution.methods\n")
    out = run_lint("--config", str(cfg))
    assert out.returncode != 0 and "BROKEN" in out.stdout, out.stdout[-2000:]


def test_the_facade_contract_sees_a_page_reaching_past_it(tmp_path):
    """The facade contract breaks on a page module that imports a library module directly (a probe package beside
    the library in a temporary folder, checked with the project's own contract)."""
    (tmp_path / "attribution").symlink_to(REPO / "attribution")
    (tmp_path / "app_pages").mkdir()
    (tmp_path / "app_pages" / "probe.py").write_text("from attribution.kernel import Kernel\n")
    cfg = tmp_path / "facade.ini"
    cfg.write_text("[importlinter]\nroot_packages =\n    attribution\n    app_pages\n\n[importlinter:contract:f]\n"
                   "name = facade\ntype = protected\nprotected_modules =\n    attribution.*\n"
                   "allowed_importers =\n    attribution\n")
    out = subprocess.run([*LINT, "--config", str(cfg)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "app_pages.probe -> attribution.kernel" in out.stdout, out.stdout[-2000:]


def attribution_imports(path: Path) -> list[str]:
    """Every module an `import attribution...` or `from attribution... import` in `path` names."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "attribution":
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "attribution"]
    return out


@pytest.mark.parametrize("path", [REPO / "app.py", *sorted((REPO / "app_pages").glob("*.py"))],
                         ids=lambda p: p.name)
def test_the_app_imports_the_public_api_only(path):
    """app.py is not a package module, so the import contract cannot see it: read its imports here (and the pages'
    again)."""
    assert set(attribution_imports(path)) <= {"attribution"}, attribution_imports(path)


def test_every_public_name_resolves_and_none_shadows_a_module():
    """Each name in attribution.__all__ loads from the module the facade names; no public name is also the name of
    a sub-module (importing the sub-module would replace the name on the package)."""
    code = ("import attribution, pkgutil, sys\n"
            "bad = [n for n in attribution.__all__ if getattr(attribution, n, None) is None]\n"
            "subs = {m.name for m in pkgutil.iter_modules(attribution.__path__)}\n"
            "print(len(attribution.__all__), bad, sorted(subs & set(attribution.__all__)))\n"
            "assert not bad and not subs & set(attribution.__all__)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]


def test_importing_the_package_is_cheap():
    """`import attribution` loads no library module and no torch (names load on first use)."""
    code = ("import sys, attribution\n"
            "print(sorted(m for m in sys.modules if m.startswith(('attribution.', 'torch'))))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


def test_the_lint_is_clean():
    """ruff with the project's configuration (pyproject.toml [tool.ruff]) finds nothing."""
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]
