#!/usr/bin/env bash
# Run a command as root inside a throwaway QEMU VM that boots Debian's own
# kernel (the one linux-image-amd64 installs, which has wireguard.ko) with
# virtme-ng, sharing the host filesystem. Tier 3 of docs/architecture.md "Test tiers".
#
#   scripts/vm-run.sh CMD [ARGS...]
#
# Exits with CMD's exit status (124 if the VM timed out, 125 if the VM or the
# guest setup failed before CMD ran). Output of CMD goes to this script's
# stdout/stderr.
#
# Inside the VM:
#   - the host's / is visible read-only (9p), cwd is preserved;
#   - /etc /usr /lib /var /home /opt /srv /tmp are copy-on-write overlays:
#     writes there stay in the VM and vanish with it (host files in /tmp are
#     visible, new ones are not written back);
#   - /run (= /var/run) is the VM's own tmpfs: /run/netns, /run/wireguard;
#   - directories in VM_RWDIRS (default: the current directory, unless it is /)
#     are writable and writes go through to the host;
#   - the wireguard module is loaded, IPv6 is enabled, lo is up;
#   - the caller's exported environment is reproduced (PATH gets the sbin
#     dirs appended), plus SIXPN_IN_VM=1.
#
# Environment:
#   VM_TIMEOUT  seconds for the whole VM run, boot included (default 900)
#   VM_CPUS     guest CPUs (default 2)         VM_MEMORY  guest RAM (default 1G)
#   VM_KERNEL   kernel version under /lib/modules (default: detected)
#   VM_RWDIRS   space-separated host dirs writable from the VM (default: $PWD)
#   VM_APPEND   extra kernel command line
#   VM_VERBOSE  1: show the kernel console and the install steps
#   VM_VENV     where virtme-ng is installed (default /opt/sixpn-vng)
set -euo pipefail

VNG_VERSION=1.42
VM_TIMEOUT="${VM_TIMEOUT:-900}"
VM_CPUS="${VM_CPUS:-2}"
VM_MEMORY="${VM_MEMORY:-1G}"
VM_VENV="${VM_VENV:-/opt/sixpn-vng}"
VM_VERBOSE="${VM_VERBOSE:-}"

say() { echo "vm-run: $*" >&2; }
die() { say "$*"; exit 125; }

if [ $# -eq 0 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
    exit 2
fi
[ "$(id -u)" = 0 ] || die "must run as root (installs packages, boots the VM as root)"

quiet() { if [ -n "$VM_VERBOSE" ]; then "$@"; else "$@" >/dev/null 2>&1; fi; }

# ---------------------------------------------------------------- install --
apt_install() {
    say "installing $*"
    export DEBIAN_FRONTEND=noninteractive
    quiet apt-get update -q || true
    quiet apt-get install -y -q --no-install-recommends "$@" ||
        die "apt-get install $* failed"
}

ensure_packages() {
    local pkgs=() p
    command -v qemu-system-x86_64 >/dev/null || pkgs+=(qemu-system-x86)
    # virtme-ng builds its initramfs around a static busybox.
    for p in linux-image-amd64 busybox-static kmod; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' ||
            pkgs+=("$p")
    done
    if [ ${#pkgs[@]} -gt 0 ]; then
        apt_install "${pkgs[@]}"
        # Debian 12's qemu-system-x86 (7.2) makes apt remove a newer
        # qemu-utils (from backports) if one was there: bring qemu-img back.
        command -v qemu-img >/dev/null || quiet apt-get install -y -q \
            --no-install-recommends qemu-utils || true
    fi
}

ensure_vng() {
    VNG="$VM_VENV/bin/vng"
    if "$VNG" --version 2>/dev/null | grep -qx "virtme-ng $VNG_VERSION"; then
        return
    fi
    say "installing virtme-ng $VNG_VERSION in $VM_VENV"
    # A venv of its own: no --break-system-packages, and it does not mix with
    # the project's Python packages.
    local py
    py="$(command -v python3 || true)"
    if [ -z "$py" ] || ! quiet "$py" -m venv --clear "$VM_VENV"; then
        apt_install python3-venv
        quiet /usr/bin/python3 -m venv --clear "$VM_VENV" || die "cannot create venv $VM_VENV"
    fi
    quiet "$VM_VENV/bin/pip" install -q --disable-pip-version-check \
        "virtme-ng==$VNG_VERSION" || die "pip install virtme-ng==$VNG_VERSION failed"
    "$VNG" --version >/dev/null 2>&1 || die "$VNG does not run"
}

# ---------------------------------------------------------------- kernel --
has_wg() { compgen -G "/lib/modules/$1/kernel/drivers/net/wireguard/wireguard.ko*" >/dev/null; }
bootable() { [ -r "/boot/vmlinuz-$1" ] && [ -f "/lib/modules/$1/modules.dep" ] && has_wg "$1"; }

detect_kernel() {
    local k
    if [ -n "${VM_KERNEL:-}" ]; then
        bootable "$VM_KERNEL" || die "VM_KERNEL=$VM_KERNEL: no /boot/vmlinuz-$VM_KERNEL or no wireguard.ko"
        echo "$VM_KERNEL"; return
    fi
    # The version linux-image-amd64 depends on right now, e.g. 6.1.0-56-amd64.
    k="$(dpkg-query -W -f='${Depends}' linux-image-amd64 2>/dev/null |
        grep -o 'linux-image-[0-9][^ ,|]*' | head -n1 | sed 's/^linux-image-//')"
    # Its -unsigned twin has the same modules directory name.
    k="${k%-unsigned}"
    if [ -n "$k" ] && bootable "$k"; then echo "$k"; return; fi
    # Otherwise the newest installed kernel with wireguard.ko, RT ones last.
    local plain=() rt=() d
    for d in /lib/modules/*/; do
        d="${d%/}"; d="${d##*/}"
        case "$d" in *-rt-*) rt+=("$d") ;; *) plain+=("$d") ;; esac
    done
    for k in $(printf '%s\n' "${plain[@]}" | sort -rV) $(printf '%s\n' "${rt[@]}" | sort -rV); do
        if bootable "$k"; then echo "$k"; return; fi
    done
    die "no kernel with wireguard.ko under /lib/modules (apt-get install linux-image-amd64)"
}

ensure_packages
ensure_vng
KVER="$(detect_kernel)"

# ------------------------------------------------------------ the VM run --
WORK="$(mktemp -d /tmp/vm-run.XXXXXX)"
VM_PGID=""
cat_out=""
cat_err=""
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
    # timeout(1) runs in a process group of its own, which holds vng and
    # qemu: end that group (only ours) so no qemu outlives this script.
    if [ -n "$VM_PGID" ] && kill -0 -- "-$VM_PGID" 2>/dev/null; then
        kill -TERM -- "-$VM_PGID" 2>/dev/null || true
        sleep 2
        kill -KILL -- "-$VM_PGID" 2>/dev/null || true
    fi
    # The output copiers, should we stop before the VM opened their FIFOs.
    for p in $cat_out $cat_err; do kill "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The caller's environment, minus what belongs to this shell or this host.
{
    bash -c 'unset OLDPWD XDG_RUNTIME_DIR DBUS_SESSION_BUS_ADDRESS HOSTNAME
             export -n PWD SHLVL _; export -p'
    printf 'export PATH=%q\n' "${PATH}:/usr/local/sbin:/usr/sbin:/sbin"
    echo 'export SIXPN_IN_VM=1'
} >"$WORK/env"

{
    printf 'cd %q || exit 125\n' "$PWD"
    printf 'exec'; printf ' %q' "$@"; printf '\n'
} >"$WORK/cmd"

# Runs in the guest, as root, before CMD.
cat >"$WORK/guest.sh" <<'EOF'
#!/bin/bash
W="$1"
fail() { echo "vm-run (guest): $*" >&2; echo 125 >"$W/status"; exit 125; }
# /run is the VM's own tmpfs (virtme-ng-init mounts it); make sure of it, so
# /run/netns and /run/wireguard never touch the host's.
[ "$(stat -f -c %T /run)" = tmpfs ] || mount -t tmpfs -o mode=755 run /run || fail "cannot mount /run"
[ "$(readlink -f /var/run)" = /run ] || mount --bind /run /var/run || fail "cannot bind /var/run"
mkdir -p /run/netns /run/wireguard /run/lock || fail "cannot create /run dirs"
modprobe wireguard || fail "modprobe wireguard failed"
[ -d /sys/module/wireguard ] || fail "wireguard module not loaded"
# /dev/net/tun, so that wireguard-go (the tier-2 backend) works here too.
modprobe tun 2>/dev/null; [ -c /dev/net/tun ] || echo "vm-run (guest): warning: no /dev/net/tun" >&2
sysctl -qw net.ipv6.conf.all.disable_ipv6=0 net.ipv6.conf.default.disable_ipv6=0 ||
    fail "cannot enable IPv6"
[ -e /proc/net/if_inet6 ] || fail "no IPv6 in this kernel"
ip link set lo up || fail "cannot bring lo up"
for t in ip wg nft ping dig; do
    PATH="$PATH:/usr/sbin:/sbin" command -v "$t" >/dev/null || echo "vm-run (guest): warning: $t not found" >&2
done
. "$W/env"
if [ -n "${VM_VERBOSE:-}" ]; then
    echo "vm-run (guest): $(uname -r), $(nproc) cpus, $(awk '/MemTotal/{print $2" kB"}' /proc/meminfo)" >&2
fi
bash "$W/cmd"
rc=$?
echo "$rc" >"$W/status"
exit "$rc"
EOF

# RW dirs: ours (for the status file), and VM_RWDIRS.
rwargs=(--rwdir "$WORK")
if [ -n "${VM_RWDIRS+x}" ]; then
    read -r -a rwdirs <<<"$VM_RWDIRS"
elif [ "$PWD" != / ]; then
    rwdirs=("$PWD")
else
    rwdirs=()
fi
for d in "${rwdirs[@]}"; do
    [ -d "$d" ] || die "VM_RWDIRS: $d is not a directory"
    d="$(cd "$d" && pwd -P)"
    [ "$d" != / ] || die "VM_RWDIRS: refusing to make / writable"
    rwargs+=(--rwdir "$d")
done

# --force-9p: Debian 12 has no Rust virtiofsd, only qemu 7.2's C one, which
# vng tries, waits 3 s for and then drops, once per shared directory.
vngargs=(--run "$KVER" --disable-kvm --cpus "$VM_CPUS" --memory "$VM_MEMORY" --user root
         --force-9p --cwd "$PWD" "${rwargs[@]}")
# udev coldplug in the guest modprobes a driver for every emulated device; in
# software emulation the big ones (kvm alone: ~6 s) are a good part of the
# boot. Keep udev from autoloading drivers that no test uses (an explicit
# modprobe still loads them).
noload=kvm,kvm_amd,kvm_intel,ccp,irqbypass,ahci,libahci,libata,sr_mod,cdrom,sg
noload+=,psmouse,pcspkr,serio_raw,evdev,button,i2c_i801,i2c_smbus,lpc_ich
noload+=,iTCO_wdt,iTCO_vendor_support,intel_pmc_bxt,i6300esb,qemu_fw_cfg,powernow_k8
vngargs+=(--append "modprobe.blacklist=$noload")
[ -z "${VM_APPEND:-}" ] || vngargs+=(--append "$VM_APPEND")
[ -z "$VM_VERBOSE" ] || vngargs+=(--verbose)

# qemu writes the guest's output by opening /proc/self/fd/1 and /proc/self/fd/2:
# on a regular file that is a new open file at offset 0 (it overwrites a log
# that we are redirected into), so always hand it pipes.
mkfifo "$WORK/out" "$WORK/err"
cat <"$WORK/out" & cat_out=$!
cat <"$WORK/err" >&2 & cat_err=$!

[ -z "$VM_VERBOSE" ] || say "booting $KVER (timeout ${VM_TIMEOUT}s)"
start=$SECONDS
set +e
PATH="$VM_VENV/bin:$PATH" timeout -k 15 "$VM_TIMEOUT" "$VNG" "${vngargs[@]}" -- /bin/bash "$WORK/guest.sh" "$WORK" \
    </dev/null >"$WORK/out" 2>"$WORK/err" &
VM_PGID=$!
wait "$VM_PGID"
vng_rc=$?
wait "$cat_out" "$cat_err"
set -e
[ -z "$VM_VERBOSE" ] || say "VM ran $((SECONDS - start))s, vng exit $vng_rc"

if [ -s "$WORK/status" ]; then
    rc="$(cat "$WORK/status")"
elif [ "$vng_rc" = 124 ] || [ "$vng_rc" = 137 ]; then
    say "VM timed out after ${VM_TIMEOUT}s (VM_TIMEOUT)"
    rc=124
else
    say "VM ended without an exit status from the command (vng exit $vng_rc)"
    rc=125
fi
exit "$rc"
