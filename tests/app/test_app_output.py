"""No accidental output: Streamlit's "magic" (rendering any bare expression) is off, and no page holds a bare
expression that magic would render (a `...train_features().kernel` line once dumped a whole Kernel object)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_streamlit_magic_is_off():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["runner"]["magicEnabled"] is False


def displayed_by_magic(source: str) -> list[str]:
    """The statements Streamlit's magic would display: bare expressions other than calls, awaits, yields and
    docstrings (the first statement of a module, class or function)."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0]) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str)}
    return [f"line {node.lineno}: {ast.unparse(node)}" for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and id(node) not in docstrings
            and not isinstance(node.value, (ast.Call, ast.Await, ast.Yield, ast.YieldFrom))]


def test_the_check_finds_what_magic_would_show():
    assert displayed_by_magic('"""doc"""\nimport x\nx.f()\natt.kernel\n"note"\n') == ["line 4: att.kernel",
                                                                                     "line 5: 'note'"]


def test_no_page_has_a_bare_expression():
    pages = [ROOT / "app.py", *sorted((ROOT / "app_pages").glob("*.py"))]
    assert len(pages) > 5
    found = {p.name: displayed_by_magic(p.read_text()) for p in pages}
    assert {name: lines for name, lines in found.items() if lines} == {}
