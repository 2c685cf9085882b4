# shellcheck shell=bash
# Sourced by scripts/test, scripts/demo and .ci/run: go to the repo root and make sure uv is there.

UV_VERSION="0.13.9"
OPSBOT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$OPSBOT_ROOT"

# Never let `uv run` rewrite uv.lock; a stale lock must fail, not drift.
export UV_FROZEN=1

# Run as root, or through sudo when that is available.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "error: need root (or sudo) to run: $*" >&2
        return 1
    fi
}

ensure_uv() {
    local user_bin
    user_bin="$(python3 -m site --user-base 2>/dev/null || echo "$HOME/.local")/bin"
    case ":$PATH:" in *":$user_bin:"*) ;; *) export PATH="$user_bin:$PATH" ;; esac
    if command -v uv >/dev/null 2>&1; then
        return 0
    fi
    echo "uv not found: installing uv==$UV_VERSION with pip --user" >&2
    if ! python3 -m pip --version >/dev/null 2>&1; then
        echo "error: python3 has no pip; install python3-pip (or uv: https://docs.astral.sh/uv/)" >&2
        return 1
    fi
    # --user only writes to ~/.local; Debian's PEP 668 marker needs --break-system-packages for that.
    python3 -m pip install --user --quiet "uv==$UV_VERSION" 2>/dev/null \
        || python3 -m pip install --user --quiet --break-system-packages "uv==$UV_VERSION"
    hash -r
    command -v uv >/dev/null 2>&1 || { echo "error: uv installed but not on PATH ($user_bin)" >&2; return 1; }
}
