# Shared by ./crewmesh and scripts/test: make sure a system dependency is present,
# installing it from the Debian/Ubuntu archive when we can (root, or passwordless
# sudo), or stop with one line saying what is missing and how to get it.

_apt_updated=""

apt_install() {
  local pkgs=("$@") sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo="sudo"
    else
      echo "missing: ${pkgs[*]} — install with: sudo apt-get install -y ${pkgs[*]}" >&2
      exit 1
    fi
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "missing: ${pkgs[*]} — this is not a Debian/Ubuntu system; install them with your package manager" >&2
    exit 1
  fi
  echo "installing ${pkgs[*]} (apt-get)..." >&2
  if [ -z "$_apt_updated" ]; then
    $sudo apt-get update -qq >/dev/null
    _apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
}

ensure_cargo() {
  command -v cargo >/dev/null 2>&1 || {
    echo "missing: cargo — install Rust from your distribution or the official installer" >&2
    exit 1
  }
}

# etcd-client's build script compiles etcd's protos with protoc.
ensure_protoc() {
  command -v protoc >/dev/null 2>&1 || [ -n "${PROTOC:-}" ] || apt_install protobuf-compiler
}

ensure_etcd() {
  command -v etcd >/dev/null 2>&1 || [ -n "${CREWMESH_ETCD_BIN:-}" ] || apt_install etcd-server
}

ensure_postgres() {
  if [ -n "${CREWMESH_PG_INITDB:-}" ] || command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    return
  fi
  apt_install postgresql
}

ensure_python() {
  command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
  python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv
}

# The gateway's OIDC tests make RSA keys with the openssl command.
ensure_openssl() {
  command -v openssl >/dev/null 2>&1 || apt_install openssl
}
