#!/usr/bin/env bash
# The base image for machines that reach Debian's package mirror but no image registry (this one):
# Debian 12 "bookworm" (Python 3.11, as bentofile.yaml asks) from debootstrap --variant=minbase with only
# python3, python3-venv and ca-certificates, imported as localhost/spo-serve-base:bookworm. It provides
# what BentoML's generated Dockerfile expects of a custom base image: bash, groupadd/useradd, apt-get
# with a working sources.list, and `pip` on PATH. Debian's own python refuses pip installs (PEP 668), so
# `pip` is a virtual environment's, /opt/venv (BentoML uses it only to install uv, which then makes
# the server's own environment /app/.venv from /usr/bin/python3.11).
# Usage: bash deploy/container/base.sh  (root: debootstrap needs it). Rebuilds the image each time.
set -euo pipefail
cd "$(dirname "$0")/../.."
source deploy/container/lib.sh
[ -n "${ENGINE:-}" ] || pick_engine

SUITE=bookworm
ROOTFS="$PWD/$BUILD_DIR/rootfs"

# The mirror this machine's apt already uses (a proxy or local mirror stays the same), never a guess:
# the first deb URI ending in /debian in sources.list(.d), one-line or deb822 format.
apt_mirror() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        grep -hE '^[[:space:]]*(deb[[:space:]]|URIs:)' "$f" | grep -v '^[[:space:]]*#' \
            | sed -E 's/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?//; s/^[[:space:]]*URIs:[[:space:]]*//' \
            | tr ' ' '\n'
    done | grep -E '^(https?|file)://.*/debian/?$' | head -1
}

# debootstrap can leave /proc or /sys mounted inside the tree after a failure: unmount before deleting.
clean_rootfs() {
    local m
    for m in $(findmnt -rn -o TARGET | grep -F "$ROOTFS/" | sort -r); do umount -l "$m" || true; done
    rm -rf --one-file-system "$ROOTFS"
}

[ "$(id -u)" = 0 ] || die "base.sh needs root (debootstrap); or build as root once, the image is then reused"
need debootstrap
MIRROR=${DEBIAN_MIRROR:-$(apt_mirror)}
[ -n "$MIRROR" ] || die "no Debian mirror found in /etc/apt/sources.list*; set DEBIAN_MIRROR"
log "debootstrap $SUITE (minbase) from $MIRROR"
clean_rootfs
trap clean_rootfs EXIT
mkdir -p "$ROOTFS"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$ROOTFS" "$MIRROR" > "$BUILD_DIR/debootstrap.log" 2>&1 \
    || { tail -20 "$BUILD_DIR/debootstrap.log" >&2; die "debootstrap (log: $BUILD_DIR/debootstrap.log)"; }

chroot "$ROOTFS" /usr/bin/python3 -m venv /opt/venv
chroot "$ROOTFS" /opt/venv/bin/pip --version >/dev/null
# Later apt-get installs (BentoML's build step adds build-essential and git) skip documentation too.
cat > "$ROOTFS/etc/dpkg/dpkg.cfg.d/01-spo-serve-nodoc" <<'EOF'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
EOF
# Like Debian's official container images (which python:3.11-slim starts from): apt keeps no downloaded
# .deb files or binary caches and fetches compressed indexes without translations; otherwise BentoML's
# apt-get step leaves about 220 MB of them in its layer.
cat > "$ROOTFS/etc/apt/apt.conf.d/01-spo-serve-slim" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::Languages "none";
Acquire::GzipIndexes "true";
Acquire::CompressionTypes::Order:: "gz";
APT::Install-Recommends "false";
APT::Install-Suggests "false";
EOF
chroot "$ROOTFS" apt-get clean
find "$ROOTFS/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete
find "$ROOTFS/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/var/lib/apt/lists/* \
    "$ROOTFS"/var/log/* "$ROOTFS"/tmp/* "$ROOTFS/etc/resolv.conf" "$ROOTFS/etc/hostname"
find "$ROOTFS/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
: > "$ROOTFS/etc/machine-id"

log "importing $(du -sh "$ROOTFS" | cut -f1) as $BASE_IMAGE"
# SSL_CERT_FILE: uv (which BentoML's Dockerfile installs with) trusts Debian's CA store, as Debian's pip
# and python do, instead of its own bundled roots.
tar --numeric-owner -C "$ROOTFS" -c . | "$ENGINE" import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'LABEL org.opencontainers.image.description="Debian bookworm minbase + python3 + /opt/venv (spo-serve deploy/container/base.sh)"' \
    --change 'CMD ["python3"]' \
    - "$BASE_IMAGE" >/dev/null
"$ENGINE" run --rm "$BASE_IMAGE" sh -c 'python3 --version && pip --version && command -v useradd apt-get bash' >&2 \
    || die "the imported base image does not run"
log "base image $BASE_IMAGE ready"
