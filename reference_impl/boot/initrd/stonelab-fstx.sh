#!/bin/sh
# stonelab-fstx: boot the state the boot entry asks for (moss.fstx=<id> on the kernel command line).
#
# Runs in the initramfs after the root filesystem is mounted at $SYSROOT and before switch_root.  POSIX sh,
# busybox applets only.  If moss.fstx differs from $SYSROOT/usr/.stateID, that state is activated:
#   - /usr a real directory: the active tree is archived to .moss/root/<active>/usr and the wanted tree moved in;
#   - /usr a symlink to .moss/root/<id>/usr: the link is replaced atomically (rename of a new link).
# If the wanted state's tree is gone, the newest state that still has a tree is booted and the console says so
# (upstream drops to an emergency shell here — moss #585).  An interrupted exchange (no /usr) is finished on the
# next boot.  Exit status: 0 = booting something, 1 = nothing bootable (the caller should go to an emergency shell).
#
# Environment (for tests): SYSROOT (default /sysroot), FSTX_CMDLINE (default /proc/cmdline), FSTX_CONSOLE
# (default /dev/console, falling back to stderr).

SYSROOT=${SYSROOT:-/sysroot}
FSTX_CMDLINE=${FSTX_CMDLINE:-/proc/cmdline}
FSTX_CONSOLE=${FSTX_CONSOLE:-/dev/console}
ARCHIVE="$SYSROOT/.moss/root"

say() {
    if [ -w "$FSTX_CONSOLE" ] || { [ ! -e "$FSTX_CONSOLE" ] && [ "$FSTX_CONSOLE" != /dev/console ]; }; then
        echo "stonelab-fstx: $*" >>"$FSTX_CONSOLE"
    else
        echo "stonelab-fstx: $*" >&2
    fi
}

is_number() {
    case "$1" in
        ''|*[!0-9]*) return 1 ;;
        *) return 0 ;;
    esac
}

wanted_state() {
    [ -r "$FSTX_CMDLINE" ] || return 0
    value=""
    set -f  # the command line is split into words, never globbed
    for word in $(cat "$FSTX_CMDLINE"); do
        case "$word" in
            moss.fstx=*) value=${word#moss.fstx=} ;;
        esac
    done
    set +f
    if [ -n "$value" ] && is_number "$value"; then
        echo "$value"
    elif [ -n "$value" ]; then
        say "ignoring malformed moss.fstx=$value"
    fi
}

active_state() {
    [ -r "$SYSROOT/usr/.stateID" ] || return 0
    id=$(tr -d ' \n' <"$SYSROOT/usr/.stateID")
    is_number "$id" && echo "$id"
}

# The newest state id with a tree under .moss/root (the active tree /usr is considered by the caller).
newest_archived() {
    best=""
    for dir in "$ARCHIVE"/*/usr; do
        [ -d "$dir" ] || continue
        id=${dir%/usr}
        id=${id##*/}
        is_number "$id" || continue
        if [ -z "$best" ] || [ "$id" -gt "$best" ]; then
            best=$id
        fi
    done
    echo "$best"
}

activate() {  # $1 = wanted id, $2 = active id (may be empty when /usr is missing)
    target="$ARCHIVE/$1/usr"
    if [ -L "$SYSROOT/usr" ]; then
        ln -s ".moss/root/$1/usr" "$SYSROOT/usr.fstx-new" || return 1
        if ! mv -T "$SYSROOT/usr.fstx-new" "$SYSROOT/usr"; then
            rm -f "$SYSROOT/usr.fstx-new"
            return 1
        fi
        sync
        return 0
    fi
    if [ -e "$SYSROOT/usr" ]; then
        if [ -z "$2" ]; then
            say "$SYSROOT/usr has no valid .stateID; not replacing it"
            return 1
        fi
        if [ -e "$ARCHIVE/$2/usr" ]; then
            say "cannot archive state $2: $ARCHIVE/$2/usr already exists"
            return 1
        fi
        mkdir -p "$ARCHIVE/$2" || return 1
        mv "$SYSROOT/usr" "$ARCHIVE/$2/usr" || return 1
        sync
    fi
    # Between the two renames there is no /usr; the next boot completes the move (see the top of main).
    mv "$target" "$SYSROOT/usr" || return 1
    rmdir "$ARCHIVE/$1" 2>/dev/null
    sync
    return 0
}

main() {
    wanted=$(wanted_state)
    active=$(active_state)
    if [ ! -e "$SYSROOT/usr" ] && [ ! -L "$SYSROOT/usr" ]; then
        # An interrupted exchange: finish it with the wanted state or the newest one left.
        if [ -z "$wanted" ] || [ ! -d "$ARCHIVE/$wanted/usr" ]; then
            wanted=$(newest_archived)
        fi
        if [ -z "$wanted" ]; then
            say "no /usr and no state tree under $ARCHIVE: nothing to boot"
            return 1
        fi
        say "no /usr (interrupted activation): activating state $wanted"
        activate "$wanted" "" || { say "activating state $wanted failed"; return 1; }
        return 0
    fi
    [ -n "$wanted" ] || return 0
    [ "$wanted" = "$active" ] && return 0
    if [ ! -d "$ARCHIVE/$wanted/usr" ]; then
        newest=$(newest_archived)
        if [ -n "$newest" ] && { [ -z "$active" ] || [ "$newest" -gt "$active" ]; }; then
            say "state $wanted is gone; booting the newest remaining state $newest instead"
            activate "$newest" "$active" || { say "activating state $newest failed; booting state $active"; }
        else
            say "state $wanted is gone; booting the newest remaining state ${active:-?} instead"
        fi
        return 0
    fi
    say "activating state $wanted (was ${active:-?}) as the boot entry asks"
    if ! activate "$wanted" "$active"; then
        say "activating state $wanted failed; booting state ${active:-?}"
    fi
    return 0
}

main
