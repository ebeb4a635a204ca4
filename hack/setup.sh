#!/usr/bin/env bash
# Idempotent set-up of a Debian 12 machine for pyvm: apt packages, the .venv with pyvm installed,
# the shim on containerd's PATH, the default config, and the guest images.
#   PYVM_SKIP_GUEST=1  skip building guest images
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

APT_PACKAGES=(
  containerd runc crun
  qemu-system-x86 qemu-system-arm qemu-utils ovmf qemu-efi-aarch64
  containernetworking-plugins prometheus
  debootstrap busybox-static cpio zstd e2fsprogs kmod
  qemu-user-static binfmt-support
  golang-github-containerd-containerd-dev golang-github-gogo-protobuf-dev golang-github-containerd-cgroups-dev
  iproute2 socat procps python3-venv
)

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing apt packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "apt packages present"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.pyvm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log "installing pyvm and its Python dependencies into .venv"
  .venv/bin/pip install -q -U pip wheel setuptools
  .venv/bin/pip install -q -e ".[dev]"
  touch "$stamp"
else
  log ".venv up to date"
fi

log "linking containerd-shim-pyvm-v2 and pyvm into /usr/local/bin"
ln -sf "$ROOT/.venv/bin/containerd-shim-pyvm-v2" /usr/local/bin/containerd-shim-pyvm-v2
ln -sf "$ROOT/.venv/bin/pyvm" /usr/local/bin/pyvm

arch=$(uname -m)
conf=config/configuration.toml
[ "$arch" = aarch64 ] && [ -f config/configuration-arm64.toml ] && conf=config/configuration-arm64.toml
if [ -f "$conf" ]; then
  mkdir -p /etc/pyvm
  install -m 0644 "$conf" /etc/pyvm/configuration.toml
fi

# containerd 1.7 (Debian trixie's package, unpacked next to 1.6; only for the compatibility tests)
if [ "${PYVM_SKIP_CONTAINERD17:-0}" != 1 ] && [ -x hack/fetch-containerd17.sh ]; then
  hack/fetch-containerd17.sh
fi

if [ "${PYVM_SKIP_GUEST:-0}" != 1 ] && [ -x hack/build-guest.sh ]; then
  hack/build-guest.sh
  # the VM template of the node's configuration: pod VMs restore it instead of cold-booting firmware,
  # kernel and agent (about 0.5 s instead of about 9 s under TCG); a no-op when it is up to date.
  # Then drop the templates of earlier guest images or configurations.
  log "building the VM template of /etc/pyvm/configuration.toml"
  .venv/bin/pyvm template build --vcpus all
  .venv/bin/pyvm template rm --vcpus all
fi
log "setup done"
