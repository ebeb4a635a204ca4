#!/usr/bin/env bash
# pyvm quickstart: on a fresh Debian 12 machine (as root), install everything and run one container
# in a VM through containerd, then print what shows it ran in a VM.
#
#   ./hack/quickstart.sh            # PYVM_SKIP_SETUP=1 skips hack/setup.sh (already set up)
#
# What it does:
#   1. hack/setup.sh (apt packages, .venv, the shim on PATH, /etc/pyvm config, guest image);
#   2. starts a PRIVATE containerd 1.6 under a temp dir (own root, state, sockets, config with the
#      pyvm runtime registered). The system containerd, if any, is not touched: no config edit, no
#      restart, nothing imported into it. (To use pyvm with the system containerd: `pyvm install`.)
#   3. builds a tiny busybox image with hack/mkimage.py (no registry) and imports it;
#   4. `ctr run --rm --runtime io.containerd.pyvm.v2 IMG ID ...` prints the guest kernel, boot id,
#      memory and cgroup view from inside the container;
#   5. prints guest kernel next to host kernel, the accelerator (TCG is reported loudly), boot time;
#   6. cleans up: containerd stopped, temp dir removed, and it checks no QEMU/virtiofsd/shim/mount
#      is left. Exit 0 on success.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
bold() { printf '\033[1m%s\033[0m\n' "$*"; }
log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf '\033[1;31mquickstart: %s\033[0m\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (containerd, QEMU's memfd share and virtio-fs need it)"

if [ "${PYVM_SKIP_SETUP:-0}" != 1 ]; then
  log "hack/setup.sh"
  ./hack/setup.sh
fi
PY=$ROOT/.venv/bin/python
[ -x "$PY" ] || die ".venv missing: run hack/setup.sh"
command -v containerd-shim-pyvm-v2 >/dev/null || die "containerd-shim-pyvm-v2 not on PATH: run hack/setup.sh"

WORK=$(mktemp -d /tmp/pyvm-qs-XXXXXX)   # short: unix socket paths must stay < 108 bytes
CTRD_PID=""
cleanup() {
  set +e
  if [ -n "$CTRD_PID" ] && kill -0 "$CTRD_PID" 2>/dev/null; then
    ctr --address "$WORK/containerd.sock" task kill -s SIGKILL qs 2>/dev/null
    ctr --address "$WORK/containerd.sock" task rm -f qs >/dev/null 2>&1
    ctr --address "$WORK/containerd.sock" container rm qs >/dev/null 2>&1
    kill "$CTRD_PID"; wait "$CTRD_PID" 2>/dev/null
  fi
  # anything mounted below the work dir (snapshots, sandbox shares) goes before the directory
  grep -o " $WORK[^ ]*" /proc/self/mountinfo 2>/dev/null | sort -r | xargs -r -n1 umount -l 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

cat >"$WORK/config.toml" <<EOF
version = 2
root = "$WORK/root"
state = "$WORK/state"
[grpc]
  address = "$WORK/containerd.sock"
[ttrpc]
  address = "$WORK/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pyvm]
    runtime_type = "io.containerd.pyvm.v2"
EOF

log "starting a private containerd in $WORK"
PYVM_RUN_ROOT="$WORK/run" containerd --config "$WORK/config.toml" >"$WORK/containerd.log" 2>&1 &
CTRD_PID=$!
for _ in $(seq 100); do
  ctr --address "$WORK/containerd.sock" version >/dev/null 2>&1 && break
  kill -0 "$CTRD_PID" 2>/dev/null || { tail -20 "$WORK/containerd.log" >&2; die "containerd died"; }
  sleep 0.2
done
CTR=(ctr --address "$WORK/containerd.sock")

IMG=pyvm.quickstart/busybox:1
log "building and importing $IMG (hack/mkimage.py, no registry)"
"$PY" hack/mkimage.py -o "$WORK/busybox.tar" -n "$IMG" >/dev/null
"${CTR[@]}" images import "$WORK/busybox.tar" >/dev/null

log "ctr run --rm --runtime io.containerd.pyvm.v2 $IMG qs ... (boots a VM)"
t0=$(date +%s.%N)
OUT=$("${CTR[@]}" run --rm --runtime io.containerd.pyvm.v2 "$IMG" qs sh -c '
  echo "kernel=$(uname -r)"
  echo "boot_id=$(cat /proc/sys/kernel/random/boot_id)"
  echo "memtotal=$(grep MemTotal /proc/meminfo | tr -s " " | cut -d" " -f2-)"
  echo "cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2- | sed "s/^ //")"
  echo "hello from a pyvm VM"')
t1=$(date +%s.%N)
echo "$OUT" | grep -q "hello from a pyvm VM" || die "the container did not run: $OUT"

field() { echo "$OUT" | sed -n "s/^$1=//p"; }
# the verdict for the configuration the shim used (the cache holds one per QEMU/kernel/arch)
ACCEL=$(.venv/bin/pyvm env --json 2>/dev/null | "$PY" -c '
import json, sys
try:
    d = json.load(sys.stdin)
    why = " ".join(str(d.get("accelerator_reason", "")).replace("|", "/").split())
    why = why.split("KVM unusable: ", 1)[-1][:160]
    print(d.get("accelerator") or "?", "|", why, "|", d.get("accelerator_speed_factor") or "?")
except Exception:
    print("? | accelerator verdict not available | ?")
')
accel=${ACCEL%% |*}
BOOT=$(grep -o '"sandbox_ready_s": *[0-9.]*' "$WORK/containerd.log" | tail -1 | grep -o '[0-9.]*$' || true)
[ -n "$BOOT" ] || BOOT=$(grep -o 'sandbox_ready_s=[0-9.]*' "$WORK/containerd.log" | tail -1 | cut -d= -f2 || true)

echo
bold "pyvm quickstart: the container ran in a VM"
printf '  %-22s %s\n' "guest kernel:" "$(field kernel)"
printf '  %-22s %s\n' "host kernel:" "$(uname -r)"
printf '  %-22s %s\n' "guest boot id:" "$(field boot_id)"
printf '  %-22s %s\n' "host boot id:" "$(cat /proc/sys/kernel/random/boot_id)"
printf '  %-22s %s\n' "guest MemTotal:" "$(field memtotal)"
printf '  %-22s %s\n' "guest CPU:" "$(field cpu)"
if [ "$accel" = tcg ]; then
  printf '  %-22s \033[1;33m%s\033[0m\n' "accelerator:" "TCG — SOFTWARE EMULATION (KVM unusable here: $(echo "$ACCEL" | cut -d'|' -f2 | sed 's/^ //;s/ $//'); ~$(echo "$ACCEL" | cut -d'|' -f3 | tr -d ' ')x slower)"
else
  printf '  %-22s %s\n' "accelerator:" "$accel"
fi
HOW=cold-booted
grep -q "VM restored from its template" "$WORK/containerd.log" && HOW="restored from its VM template (pyvm template show)"
printf '  %-22s %s\n' "VM start:" "$HOW"
printf '  %-22s %s\n' "VM boot (to agent):" "${BOOT:-?} s"
printf '  %-22s %s s\n' "ctr run wall time:" "$("$PY" -c "print(round($t1 - $t0, 1))")"
echo

# the shim exits after the task is deleted and stops the VM on its way out: wait for it
ours="$WORK/run|-address $WORK/containerd.sock"
for _ in $(seq 120); do
  pgrep -f "$ours" >/dev/null || break
  sleep 0.5
done
left=$(pgrep -af "$ours" || true)
[ -z "$left" ] || die "left behind: $left"
log "clean: no VM, virtiofsd or shim left"
