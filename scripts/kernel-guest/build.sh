#!/usr/bin/env bash
# Builds the kernel-client test guest: a Debian kernel plus a small initramfs
# holding busybox-static, Debian's nbd-client, mke2fs, e2fsck and the modules
# the guest needs (nbd, e1000, ext4, virtio-blk and their dependencies),
# and the guest programs *-mode.sh that init.sh runs for guestmode=NAME.
#
# Usage: scripts/kernel-guest/build.sh WORKDIR
#
# Produces WORKDIR/vmlinuz and WORKDIR/initrd.img (gzip cpio). Cached: the
# kernel is downloaded and extracted once; the initramfs is rebuilt only when
# its inputs (init.sh, this script, the copied binaries, the modules) change.
# Safe to run concurrently for the same WORKDIR (flock).
#
# Env: KERNEL_PKG overrides the kernel package (default: what the
# linux-image-amd64 metapackage depends on, a linux-image-6.1.0-N-amd64).
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 WORKDIR" >&2
  exit 2
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORKDIR="$1"
mkdir -p "$WORKDIR"
WORKDIR="$(cd "$WORKDIR" && pwd)"

log() { echo "kernel-guest/build: $*" >&2; }

# One builder at a time per WORKDIR.
exec 9>"$WORKDIR/.build.lock"
flock 9

MODULES=(crc16 crc32c_generic mbcache jbd2 ext4 nbd e1000)
# virtio-blk, for guests whose disk QEMU itself serves (migrate-mode.sh), in load order.
MODULES+=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk)
BINARIES=(/usr/sbin/nbd-client /sbin/mke2fs /sbin/e2fsck)

apt_updated=0
apt_update_once() {
  if [ "$apt_updated" -eq 0 ]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    apt_updated=1
  fi
}

ensure_pkgs() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    log "need root to install: ${missing[*]}"
    exit 1
  fi
  log "installing ${missing[*]}"
  apt_update_once
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

ensure_pkgs busybox-static nbd-client e2fsprogs cpio gzip

# ---------------------------------------------------------------- kernel ----
KDIR="$WORKDIR/kernel"
# Extracted again when the module list changes (modules.list).
if [ ! -s "$WORKDIR/vmlinuz" ] || [ ! -s "$KDIR/modules.ok" ] \
  || [ "$(cat "$KDIR/modules.list" 2>/dev/null)" != "${MODULES[*]}" ]; then
  pick_pkg() {
    apt-cache depends linux-image-amd64 2>/dev/null \
      | awk '/Depends: linux-image-6\.1\.0-[0-9]+-amd64$/ {print $2; exit}'
  }
  pkg="${KERNEL_PKG:-}"
  if [ -z "$pkg" ]; then
    pkg="$(pick_pkg || true)"
    if [ -z "$pkg" ]; then
      apt_update_once
      pkg="$(pick_pkg || true)"
    fi
    if [ -z "$pkg" ]; then
      pkg="$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' \
        | awk '{print $1}' | sort -V | tail -n1)"
    fi
  fi
  [ -n "$pkg" ] || { log "cannot find a linux-image-6.1.0-*-amd64 package"; exit 1; }

  rm -rf "$KDIR"
  mkdir -p "$KDIR/deb" "$KDIR/root" "$KDIR/modules"
  log "downloading $pkg"
  # apt-get download as root drops to _apt; give it a writable directory.
  chmod 777 "$KDIR/deb"
  if ! (cd "$KDIR/deb" && apt-get download -q "$pkg" >&2); then
    apt_update_once
    (cd "$KDIR/deb" && apt-get download -q "$pkg" >&2)
  fi
  deb="$(find "$KDIR/deb" -name '*.deb' | head -n1)"
  [ -n "$deb" ] || { log "download of $pkg failed"; exit 1; }
  log "extracting $(basename "$deb")"
  dpkg -x "$deb" "$KDIR/root"

  vmlinuz="$(find "$KDIR/root/boot" -name 'vmlinuz-*' | head -n1)"
  [ -n "$vmlinuz" ] || { log "no vmlinuz in $pkg"; exit 1; }
  cp "$vmlinuz" "$KDIR/vmlinuz"
  kver="${vmlinuz##*/vmlinuz-}"
  moddir=""
  for d in "$KDIR/root/lib/modules/$kver" "$KDIR/root/usr/lib/modules/$kver"; do
    if [ -d "$d" ]; then moddir="$d"; break; fi
  done
  [ -n "$moddir" ] || { log "no module directory for $kver"; exit 1; }

  for m in "${MODULES[@]}"; do
    f="$(find "$moddir/kernel" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" \) | head -n1)"
    if [ -z "$f" ]; then
      # Built in? Then there is nothing to load.
      if grep -q "/$m.ko\$" "$moddir/modules.builtin" 2>/dev/null; then
        log "module $m is built in"
        continue
      fi
      log "module $m not found in $pkg"
      exit 1
    fi
    case "$f" in
      *.ko)     cp "$f" "$KDIR/modules/$m.ko" ;;
      *.ko.xz)  ensure_pkgs xz-utils; xz -dc "$f" >"$KDIR/modules/$m.ko" ;;
      *.ko.zst) ensure_pkgs zstd; zstd -qdc "$f" >"$KDIR/modules/$m.ko" ;;
      *.ko.gz)  gzip -dc "$f" >"$KDIR/modules/$m.ko" ;;
    esac
  done
  echo "$pkg $kver" >"$KDIR/modules.ok"
  echo "${MODULES[*]}" >"$KDIR/modules.list"
  # Only vmlinuz and the few modules are needed from now on.
  rm -rf "$KDIR/root" "$KDIR/deb"
  mv "$KDIR/vmlinuz" "$WORKDIR/vmlinuz"
  log "kernel ready: $(cat "$KDIR/modules.ok")"
fi

# ------------------------------------------------------------- initramfs ----
BUSYBOX="$(command -v busybox || true)"
[ -n "$BUSYBOX" ] || BUSYBOX=/bin/busybox
if ldd "$BUSYBOX" >/dev/null 2>&1; then
  log "$BUSYBOX is dynamically linked; busybox-static is required"
  exit 1
fi

# Every file the initramfs is built from, plus this script itself.
libs_of() {
  ldd "$1" | awk '/=> \// {print $3} /^[ \t]*\/[^ ]+ \(0x/ {print $1}'
}
inputs=("$HERE/init.sh" "$HERE"/*-mode.sh "${BASH_SOURCE[0]}" "$BUSYBOX" "${BINARIES[@]}")
for b in "${BINARIES[@]}"; do
  while read -r l; do inputs+=("$l"); done < <(libs_of "$b")
done
[ -f /etc/mke2fs.conf ] && inputs+=(/etc/mke2fs.conf)
stamp="$( { sha256sum "${inputs[@]}" | awk '{print $1}'; cat "$KDIR/modules.ok"; ls -l "$KDIR/modules"; } | sha256sum | awk '{print $1}')"

if [ -s "$WORKDIR/initrd.img" ] && [ "$(cat "$WORKDIR/initrd.stamp" 2>/dev/null)" = "$stamp" ]; then
  log "cached: $WORKDIR/vmlinuz $WORKDIR/initrd.img"
  exit 0
fi

log "building initramfs"
R="$WORKDIR/initramfs.tmp"
rm -rf "$R"
mkdir -p "$R"/{bin,sbin,lib,lib64,etc,proc,sys,dev,tmp,mnt,modules,usr}
ln -s ../lib "$R/usr/lib"
ln -s ../bin "$R/usr/bin"
ln -s ../sbin "$R/usr/sbin"

cp "$BUSYBOX" "$R/bin/busybox"
ln -s busybox "$R/bin/sh"
for b in "${BINARIES[@]}"; do
  cp -L "$b" "$R/sbin/$(basename "$b")"
  while read -r l; do
    mkdir -p "$R$(dirname "$l")"
    [ -e "$R$l" ] || cp -L "$l" "$R$l"
  done < <(libs_of "$b")
done
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$R/etc/mke2fs.conf"
cp "$KDIR"/modules/*.ko "$R/modules/" 2>/dev/null || true
printf '%s\n' "${MODULES[@]}" >"$R/modules/order"
cp "$HERE/init.sh" "$R/init"
# Guest programs init.sh hands over to (guestmode=NAME runs /NAME-mode.sh).
cp "$HERE"/*-mode.sh "$R/"
chmod 755 "$R/init"
# Minimal device nodes in case devtmpfs is not mounted yet when /init starts.
mknod -m 600 "$R/dev/console" c 5 1 2>/dev/null || true
mknod -m 666 "$R/dev/null" c 1 3 2>/dev/null || true

(cd "$R" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet | gzip -6) >"$WORKDIR/initrd.img.tmp"
mv "$WORKDIR/initrd.img.tmp" "$WORKDIR/initrd.img"
echo "$stamp" >"$WORKDIR/initrd.stamp"
rm -rf "$R"
log "built: $WORKDIR/vmlinuz $WORKDIR/initrd.img ($(du -k "$WORKDIR/initrd.img" | cut -f1) KiB)"
