#!/bin/sh
# The lab's guest init (PID 1 in the initramfs). Modes from the kernel command line:
#   stonelab.mode=agent (default) | shell | initramfs-shell | poweroff ; stonelab.python=PATH ;
#   stonelab.project=DIR ; stonelab.userland=vdX (the read-only EROFS userland image on that virtio disk; without
#   it the host root over 9p).  initramfs-shell: busybox only.  A guest on the EROFS image (or busybox only) can
#   be saved and restored; QEMU refuses to migrate a guest with a mounted 9p export.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "STONELAB-INIT uptime=$(cut -d' ' -f1 /proc/uptime)"
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1="*) echo "${w#*=}"; return;; esac; done; echo "$2"; }
die() { echo "STONELAB-INIT-FAILED $*"; sync; poweroff -f; }
MODE=$(arg stonelab.mode agent)
[ "$MODE" = poweroff ] && { echo STONELAB-POWEROFF; poweroff -f; }
USERLAND=$(arg stonelab.userland "")
for m in /mod/*.ko; do
  [ -e "$m" ] || continue
  case "${m#/mod/???-}" in netfs.ko|fscache.ko|9pnet.ko|9pnet_virtio.ko|9p.ko) [ -n "$USERLAND" ] && continue;; esac
  insmod "$m" || echo "stonelab-init: insmod $m failed"
done
echo "STONELAB-MODULES uptime=$(cut -d' ' -f1 /proc/uptime)"
if [ "$MODE" = initramfs-shell ]; then
  echo "STONELAB-INITRAMFS-SHELL"
  while true; do setsid cttyhack sh; done
fi
if [ -n "$USERLAND" ]; then
  i=0; while [ ! -b "/dev/$USERLAND" ] && [ $i -lt 100 ]; do usleep 20000; i=$((i+1)); done
  mount -t erofs -o ro "/dev/$USERLAND" /host || die "erofs userland on /dev/$USERLAND"
else
  mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose host /host || die "9p host root"
fi
mount -t proc proc /host/proc || die "proc in /host"
mount -t sysfs sys /host/sys
mount -t devtmpfs dev /host/dev
mkdir -p /dev/pts /dev/shm /dev/virtio-ports
mount -t devpts devpts /host/dev/pts
mkdir -p /9p && mount -o bind /host /9p || die "bind the userland"   # its own view, before tmpfs hides parts
for d in dev/shm tmp run var/tmp mnt; do mount -t tmpfs -o mode=1777 tmpfs /host/$d || die "tmpfs /$d"; done
# the project and its interpreter must stay visible even when they live below a directory tmpfs now covers
PROJ=$(arg stonelab.project /); PY=$(arg stonelab.python /usr/bin/python3)
for keep in "$PROJ" "${PY%/bin/*}"; do
  case "$keep" in /dev/shm/*|/tmp/*|/run/*|/var/tmp/*|/mnt/*)
    mkdir -p "/host$keep" && mount -o bind "/9p$keep" "/host$keep" || die "bind $keep";;
  esac
done
ports() {
  for p in /sys/class/virtio-ports/*; do
    [ -e "$p/name" ] || continue; n=$(cat "$p/name"); [ -n "$n" ] && ln -sf "../${p##*/}" "/dev/virtio-ports/$n"
  done
}
i=0; while [ $i -lt 100 ]; do ports; [ -e /dev/virtio-ports/org.stonelab.agent ] && break; usleep 50000; i=$((i+1)); done
ports
echo "STONELAB-USERLAND uptime=$(cut -d' ' -f1 /proc/uptime)"
# the interpreter's own bin directory first: `python3` in a guest command is the lab's interpreter (the image
# holds no other Python)
ENVV="PATH=${PY%/*}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp LANG=C.UTF-8 TERM=linux PYTHONDONTWRITEBYTECODE=1"
if [ "$MODE" = shell ]; then
  echo "STONELAB-SHELL (exit the shell to power off)"
  setsid cttyhack chroot /host /usr/bin/env -i $ENVV PYTHONPATH=$PROJ sh -c "cd $PROJ; exec /bin/bash || exec /bin/sh"
else
  # -S: the agent needs nothing from site-packages to start, and `site` (the venv's .pth files) costs a TCG boot
  # tenths of a second; the one request that needs a third-party module adds them then (vm.agent._site_packages)
  chroot /host /usr/bin/env -i $ENVV PYTHONPATH=$PROJ "$PY" -S -m vm.agent --port /dev/virtio-ports/org.stonelab.agent \
    || echo "STONELAB-AGENT-EXITED status=$?"
fi
sync
echo STONELAB-POWEROFF
poweroff -f
