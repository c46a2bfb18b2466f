# Shared by scripts/demo and scripts/test: find a Python >= 3.11 and build .venv with it.
# Sourced, not run. Uses: ROOT (repo root). Sets: VENV, PY.

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else
        echo "Error: '$*' needs root and sudo is not installed; run it as root first." >&2
        return 1
    fi
}

# apt_install PKG...: install the Debian packages that are missing (apt-get update first).
apt_install() {
    local missing=()
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "Error: missing packages ${missing[*]} and no apt-get here; install them by hand." >&2
        return 1
    fi
    echo "==> apt-get install ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# pick_python: Debian's /usr/bin/python3 when it is >= 3.11 (a system path any uid can run, which
# the tests that drop privileges need), else the first python3 on PATH.
pick_python() {
    local candidate
    for candidate in /usr/bin/python3 "$(command -v python3 || true)"; do
        [ -n "$candidate" ] && [ -x "$candidate" ] || continue
        if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "Error: Python 3.11 or newer is required (python3 --version says $(python3 --version 2>&1))." >&2
    return 1
}

# make_venv EXTRAS: (re)use .venv and install the project with the given extras ("" or "[test]").
make_venv() {
    local extras="$1"
    PY="$(pick_python)"
    VENV="$ROOT/.venv"
    if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        rm -rf "$VENV"
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        if ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
            apt_install python3-venv
        fi
        echo "==> creating $VENV with $PY"
        "$PY" -m venv "$VENV"
    fi
    echo "==> pip install -e .$extras"
    quietly "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip
    quietly "$VENV/bin/python" -m pip install --disable-pip-version-check -e "$ROOT$extras"
}

# quietly CMD...: run CMD with its output captured; show that output only if CMD fails.
quietly() {
    local log rc=0
    log="$(mktemp)"
    "$@" >"$log" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ]; then
        cat "$log" >&2
        echo "Error: '$*' failed with exit code $rc (its output is above)." >&2
    fi
    rm -f "$log"
    return "$rc"
}
