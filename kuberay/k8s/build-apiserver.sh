#!/usr/bin/env bash
# Build kube-apiserver for the real API-server test tier (`make test-k8s`) and print its path.
#
# No package registry ships kube-apiserver; Debian bookworm's `kubernetes` source package (1.20.2) builds
# one offline with Debian's Go. What this does, each step only when needed (idempotent):
#   1. apt-get install golang-go rsync etcd-server dpkg-dev golang-github-modern-go-reflect2-dev
#      (etcd-server is the tier's etcd; the others build the binary);
#   2. adds a bookworm `deb-src` entry when apt has none, so `apt-get source kubernetes` works;
#   3. the cache key is the SHA-256 of the source package's .dsc (which lists the checksums of its
#      tarballs); a binary cached under that key is printed at once (a second run takes about a second);
#   4. otherwise: fetch and unpack the source in a temporary folder and make two fixes for today's Go
#      (Debian's is 1.19; Kubernetes 1.20 was built with 1.15):
#      - the vendored github.com/modern-go/reflect2 1.0.1 crashes at start-up under Go >= 1.18: replaced
#        with Debian's 1.0.2;
#      - kube-openapi's CRD type check reads every zero value ("" and friends) as null under Go >= 1.16
#        (kubernetes/kubernetes#99804): a custom resource with an empty string, or a CRD with
#        `default: ""`, is rejected with 'must be of type string: "null"'. The upstream fix
#        (kubernetes/kube-openapi#230, in 1.21) is applied to the vendored copies;
#      then `make WHAT=cmd/kube-apiserver` under `nice` with GOPROXY=off (the build uses only the vendor/
#      tree: Kubernetes 1.20's make runs Go in GOPATH mode on vendor/), copy the binary into the cache and
#      delete the rest (~420 CPU-seconds, ~1.3 GB of temporary disk).
#
# Cache: ${LLMOPT_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llmopt/k8s}/<dsc-sha256>-r<RECIPE>/kube-apiserver,
# outside the repository (RECIPE counts changes to the fixes above). Stdout is the binary's path and
# nothing else; progress goes to stderr.
# Needs root or sudo only for the apt steps, and only when something is missing.
set -euo pipefail

CACHE="${LLMOPT_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llmopt/k8s}"
RECIPE=2  # bump when the source fixes below change
PACKAGES=(golang-go rsync etcd-server dpkg-dev golang-github-modern-go-reflect2-dev)
REFLECT2=/usr/share/gocode/src/github.com/modern-go/reflect2
DEB_SRC=/etc/apt/sources.list.d/llmopt-deb-src.sources

log() { echo "build-apiserver: $*" >&2; }

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        log "needs root for: $*; run it as root, or install those packages yourself"
        exit 1
    fi
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    as_root apt-get update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# The newest `kubernetes` source apt knows, as "version sha256-of-dsc".
source_of() {
    apt-cache showsrc --only-source kubernetes 2>/dev/null | awk '
        /^Package: / { version = ""; in_sums = 0 }
        /^Version: / { version = $2 }
        /^Checksums-Sha256:/ { in_sums = 1; next }
        /^[^ ]/ { in_sums = 0 }
        in_sums && $3 ~ /\.dsc$/ { print version, $1 }' |
        sort -V | tail -n 1
}

source_line=$(source_of || true)  # apt-cache fails while apt has no deb-src entry at all
if [[ -z $source_line ]]; then
    log "no deb-src entry for kubernetes; adding $DEB_SRC (bookworm main)"
    as_root tee "$DEB_SRC" >/dev/null <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    as_root apt-get update -qq >&2
    source_line=$(source_of)
    [[ -n $source_line ]] || { log "apt still knows no kubernetes source package"; exit 1; }
fi
read -r version dsc_sha <<<"$source_line"
key="$dsc_sha-r$RECIPE"
binary="$CACHE/$key/kube-apiserver"
if [[ -x $binary ]]; then
    log "cached: kubernetes $version ($binary)"
    echo "$binary"
    exit 0
fi

log "building kube-apiserver from Debian's kubernetes $version source; cache $binary"
log "(about 7 CPU-minutes and 1.3 GB of temporary disk; later runs reuse the cache)"
work=$(mktemp -d "${TMPDIR:-/tmp}/llmopt-k8s-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"  # apt's download sandbox user (_apt) writes here when we are root
cd "$work"
apt-get source --download-only -qq "kubernetes=$version" >&2 2> >(grep -v "unsandboxed as root" >&2)
dsc=(kubernetes_*.dsc)
echo "$dsc_sha  ${dsc[0]}" | sha256sum --check --quiet - >&2
dpkg-source -x "${dsc[0]}" src >/dev/null

# reflect2 1.0.1 reads runtime internals that changed in Go 1.18; 1.0.2 (Debian's) is API-compatible.
rm -rf src/vendor/github.com/modern-go/reflect2
cp -r "$REFLECT2" src/vendor/github.com/modern-go/reflect2
rm -f src/vendor/github.com/modern-go/reflect2/go.mod
# kubernetes/kube-openapi#230: "" (and 0, false) are values, not null; before Go 1.16 this test never held.
zero_check='if data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {'
for file in src/vendor/k8s.io/kube-openapi/pkg/validation/validate/type.go \
    src/vendor/github.com/go-openapi/validate/type.go; do
    grep -qF "$zero_check" "$file" || { log "$file: the zero-value check to fix is not there"; exit 1; }
    sed -i "s/if data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {/if data == nil {/" "$file"
    if grep -qF "$zero_check" "$file"; then log "$file: fixing the zero-value check failed"; exit 1; fi
done

cd src
# Kubernetes 1.20's make builds in GOPATH mode from vendor/ with its own GOPATH and GOCACHE under
# _output/; GOFLAGS stays empty (its build script reads -tags=... out of GOFLAGS).
mkdir -p "$work/home"
env HOME="$work/home" GOPROXY=off GOFLAGS= CGO_ENABLED=0 \
    nice -n 10 make WHAT=cmd/kube-apiserver >&2
built=_output/bin/kube-apiserver
"$built" --version >&2

mkdir -p "$CACHE/$key"
cp "$built" "$binary.tmp.$$"
mv "$binary.tmp.$$" "$binary"
echo "kubernetes $version (Debian source, .dsc sha256 $dsc_sha), recipe $RECIPE: vendored reflect2" \
    "replaced by 1.0.2, kube-openapi#230 applied; built with $(go version)" >"$CACHE/$key/SOURCE"
log "built $binary"
echo "$binary"
