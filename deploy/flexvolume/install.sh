#!/bin/sh
# Install loopvol-flexvolume as the FlexVolume driver loopvol/loopvol:
#
#   $PLUGIN_DIR/loopvol~loopvol/loopvol        the (static) driver binary
#   $PLUGIN_DIR/loopvol~loopvol/loopvol.json   its config file
#
# then, unless --once is given, sleep until stopped, so that this can be the
# container of a DaemonSet (deploy/kubernetes/flexvolume/installer.yaml).
# Safe to run again and again: an unchanged binary or config is not touched.
#
# Settings, from the environment:
#   PLUGIN_DIR      kubelet's --volume-plugin-dir
#                   (default /usr/libexec/kubernetes/kubelet-plugins/volume/exec)
#   LOOPVOL_ATTACH  true | false (default false)       -> "attach"
#   LOOPVOL_POOL    absolute path (default /var/lib/loopvol/pool) -> "pool"
#   LOOPVOL_LOG     absolute path (default /var/log/loopvol-flexvolume.log) -> "log"
#   LOOPVOL_NODE    node name; empty or unset: null, the driver uses the host name -> "node"
#   LOOPVOL_FLEXVOLUME_BIN  the binary to install (default /usr/local/bin/loopvol-flexvolume)
#
# POSIX sh only: it runs in the loopvol image and may be run on a host by hand.
set -eu

usage() {
    echo "usage: $0 [--once]" >&2
    echo "  --once  install and exit instead of sleeping until stopped" >&2
}

once=false
for arg in "$@"; do
    case $arg in
        --once) once=true ;;
        -h | --help) usage; exit 0 ;;
        *) usage; exit 2 ;;
    esac
done

# printf, not echo: dash's echo would interpret backslashes in paths.
log() { printf 'loopvol-flexvolume-install: %s\n' "$*"; }
die() { printf 'loopvol-flexvolume-install: error: %s\n' "$*" >&2; exit 1; }

PLUGIN_DIR=${PLUGIN_DIR:-/usr/libexec/kubernetes/kubelet-plugins/volume/exec}
SRC=${LOOPVOL_FLEXVOLUME_BIN:-/usr/local/bin/loopvol-flexvolume}
ATTACH=${LOOPVOL_ATTACH:-false}
POOL=${LOOPVOL_POOL:-/var/lib/loopvol/pool}
LOG=${LOOPVOL_LOG:-/var/log/loopvol-flexvolume.log}
NODE=${LOOPVOL_NODE:-}

VENDOR_DRIVER=loopvol~loopvol # <vendor>~<driver>: the PV says driver: loopvol/loopvol
DRIVER=loopvol
CONFIG=loopvol.json

# --- check the settings before touching anything --------------------------
case $ATTACH in
    true | false) ;;
    *) die "LOOPVOL_ATTACH must be true or false, not '$ATTACH'" ;;
esac
case $PLUGIN_DIR in /*) ;; *) die "PLUGIN_DIR must be an absolute path, not '$PLUGIN_DIR'" ;; esac
case $POOL in /*) ;; *) die "LOOPVOL_POOL must be an absolute path, not '$POOL'" ;; esac
case $LOG in /*) ;; *) die "LOOPVOL_LOG must be an absolute path, not '$LOG'" ;; esac
if [ ! -f "$SRC" ] || [ ! -x "$SRC" ]; then
    die "no executable driver binary at $SRC"
fi

# A JSON string literal of $1. Control characters (newlines included) are
# refused rather than escaped: no path or node name has a reason to hold one.
json_string() {
    case $1 in
        *[[:cntrl:]]*) die "control character in setting value" ;;
    esac
    escaped=$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g')
    printf '"%s"' "$escaped"
}

# One assignment each, so that a refusal (exit in the command substitution)
# stops the script under set -e.
pool_json=$(json_string "$POOL")
log_json=$(json_string "$LOG")
if [ -n "$NODE" ]; then node_json=$(json_string "$NODE"); else node_json=null; fi
config=$(printf '{"attach": %s, "pool": %s, "log": %s, "node": %s}' \
    "$ATTACH" "$pool_json" "$log_json" "$node_json")

dir=$PLUGIN_DIR/$VENDOR_DRIVER
mkdir -p "$dir"

# Put $2 (a file in $dir) in place as $dir/$1, atomically: kubelet watches the
# plugin directory and may run the driver at any moment, so it must never see
# a half-written file. The temporary name starts with a dot: kubelet ignores
# such entries. Unchanged content is left alone (no needless re-probe).
install_file() {
    name=$1 tmp=$2 mode=$3
    if [ -f "$dir/$name" ] && cmp -s "$tmp" "$dir/$name"; then
        rm -f "$tmp"
        log "$dir/$name unchanged"
    else
        chmod "$mode" "$tmp"
        mv -f "$tmp" "$dir/$name"
        log "installed $dir/$name"
    fi
}

# The config first: the binary's appearance triggers kubelet's `init` call,
# whose reply (attach or not) depends on the config.
printf '%s\n' "$config" >"$dir/.$CONFIG.tmp"
install_file "$CONFIG" "$dir/.$CONFIG.tmp" 0644

cp "$SRC" "$dir/.$DRIVER"
install_file "$DRIVER" "$dir/.$DRIVER" 0755

log "config: $config"

if [ "$once" = true ]; then
    exit 0
fi

# Idle until stopped. `sleep & wait` so that TERM (pod deletion) ends the
# script at once; PID 1 in a container gets no default signal handling.
trap 'exit 0' TERM INT
while :; do
    sleep 3600 &
    wait $! || true
done
