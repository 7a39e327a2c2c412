"""The architecture contract (.importlinter): one-way layers, no cycles, no Streamlit in the library."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"]


def run_lint(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LINT, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_the_import_contract_holds():
    out = run_lint()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_the_checker_sees_the_code(tmp_path):
    """A contract that inverts two real layers must break: the check reads the actual imports."""
    cfg = tmp_path / "inverted.ini"
    cfg.write_text("[importlinter]\nroot_packages =\n    attribution\n\n[importlinter:contract:x]\nname = inverted\n"
                   "type = layers\nlayers =\n    attribution.kernel\n    attribution.methods\n")
    out = run_lint("--config", str(cfg))
    assert out.returncode != 0 and "BROKEN" in out.stdout, out.stdout[-2000:]
