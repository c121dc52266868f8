# Shared by ops/stack, ops/demo and ops/test: install what is missing, then use the
# project's virtualenv. Works as root, or with sudo for the Debian packages.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.stack/venv"
APT_PACKAGES=(rabbitmq-server softhsm2 openssl python3-venv logrotate poppler-utils prometheus rsyslog rsyslog-relp systemd iproute2 docker-compose
  gcc libc6-dev libp11-kit-dev) # the last three build the network-HSM model (sam_devtools/hsm_delay.py)

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

ensure_packages() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    echo "installing Debian packages: ${missing[*]}" >&2
    as_root apt-get update -qq
    # the package's own service must not start: our node is separate
    as_root env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

ensure_venv() {
  local stamp="$VENV/.installed" want
  want=$(cat "$ROOT/pyproject.toml" "$ROOT/ops/devtools/pyproject.toml" | sha256sum | cut -d' ' -f1)
  if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then return; fi
  echo "preparing the virtualenv in $VENV" >&2
  mkdir -p "$ROOT/.stack"
  [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
  local log="$ROOT/.stack/pip-install.log"
  if ! { "$VENV/bin/python" -m pip install -q --upgrade "pip>=25.1" &&
    # the package with its extras, and the test tooling: a distribution of its own
    "$VENV/bin/python" -m pip install -q -e "$ROOT[dev,pdf,csc]" -e "$ROOT/ops/devtools"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "installing the Python packages failed (log: $log)" >&2
    return 1
  fi
  echo "$want" >"$stamp"
}

ensure_all() {
  ensure_packages
  ensure_venv
}
