# Shared by scripts/test, scripts/demo and bench/run: install what is missing.
# Debian packages come from apt (run as root, or with sudo); Python packages
# go into ./.venv.  Safe to run again: it only installs what is absent.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

_as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_debs() {
    # ensure_debs CMD:PACKAGE ... — install PACKAGE when CMD is not found.
    local missing=() pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] \
            || [ -x "/usr/bin/${pair%%:*}" ] || missing+=("${pair##*:}")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "==> installing Debian packages: ${missing[*]}" >&2
        _as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive _as_root apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
}

ensure_venv() {
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        ensure_debs "nonexistent-python3-venv:python3-venv"
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        echo "==> creating $VENV" >&2
        python3 -m venv "$VENV"
    fi
    local stamp="$VENV/.installed"
    if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
        echo "==> installing Python dependencies into $VENV" >&2
        "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[dev]"
        touch "$stamp"
    fi
}

ensure_all() {
    ensure_debs etcd:etcd-server mosquitto:mosquitto chromium:chromium haproxy:haproxy \
        named:bind9 systemd-analyze:systemd nft:nftables upsd:nut-server \
        certutil:libnss3-tools openssl:openssl promtool:prometheus \
        pg_ctlcluster:postgresql runuser:util-linux
    ensure_venv
}
