# Shared by build.sh, base.sh and test.sh (sourced, run from the repository root).
# Settings, all optional, read from the environment (make passes command-line variables through):
#   CONTAINER_ENGINE  docker | podman (default: docker where `docker info` succeeds, else podman)
#   CONTAINER_TORCH   cuda | cpu (default: cuda with docker, the production image; cpu with podman)
#   CONTAINER_BASE    auto | standard | debian (default auto: BentoML's python:3.11-slim when it can be
#                     pulled, else an image built here from Debian packages, see base.sh)
#   CONTAINER_IMAGE   the image's name (default spo-serve:$CONTAINER_TORCH)
#   DEBIAN_MIRROR     debootstrap's mirror (default: the first Debian mirror in this machine's apt sources)
#   VENV              the project's virtualenv (default .venv), for bentoml and pip

BUILD_DIR=deploy/container/build
VENV=${VENV:-.venv}
BENTOML="$VENV/bin/bentoml"
PYTHON="$VENV/bin/python"
BASE_IMAGE=localhost/spo-serve-base:bookworm
STANDARD_BASE=docker.io/library/python:3.11-slim   # what BentoML's Dockerfile starts from
export BENTOML_DO_NOT_TRACK=true
# Our own bento store: builds here neither read nor clutter ~/bentoml.
export BENTOML_HOME="$PWD/$BUILD_DIR/bentoml"

log() { printf '[container] %s\n' "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

# Installs Debian packages when a tool is missing and we may (root with apt-get); otherwise says which.
need() {
    local missing=() t
    for t in "$@"; do command -v "${t%%:*}" >/dev/null 2>&1 || missing+=("${t##*:}"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        log "installing ${missing[*]} (Debian packages)"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    else
        die "missing ${missing[*]}: install these Debian packages (apt-get install ${missing[*]})"
    fi
}

pick_engine() {
    if [ -n "${CONTAINER_ENGINE:-}" ]; then ENGINE=$CONTAINER_ENGINE
    elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker
    else ENGINE=podman   # e.g. this machine: a docker client but no engine
    fi
    case $ENGINE in
        docker) ;;
        podman) need podman runc; podman_settings ;;
        *) die "CONTAINER_ENGINE must be docker or podman, not $ENGINE" ;;
    esac
    TORCH=${CONTAINER_TORCH:-$([ "$ENGINE" = docker ] && echo cuda || echo cpu)}
    case $TORCH in cuda|cpu) ;; *) die "CONTAINER_TORCH must be cuda or cpu, not $TORCH" ;; esac
    IMAGE=${CONTAINER_IMAGE:-spo-serve:$TORCH}
}

# podman (and the buildah inside `podman build`) read CONTAINERS_CONF. Two settings a sandboxed VM
# like this 2-core machine needs, harmless elsewhere:
# - ulimits no higher than this shell's hard limits: podman's rootful default (nofile=1048576) is
#   refused here ("setrlimit RLIMIT_NOFILE: Operation not permitted"); nproc above 32768 too.
# - runc where cgroups are hybrid (v1 controllers plus a cgroup2 mount): Debian 12's crun refuses to
#   start any container there ("cgroups in hybrid mode not supported").
# Storage: podman's default overlay driver works here as root; a sandbox without overlay support can
# set STORAGE_DRIVER=vfs (read by podman and buildah) at the cost of disk space.
# Networking: the default bridge (netavark) works here, for the build's downloads and for publishing
# the server on 127.0.0.1 only; rootless podman uses slirp4netns (or pasta) instead.
podman_settings() {   # [file name]
    local conf="$BUILD_DIR/${1:-containers.conf}"
    mkdir -p "$BUILD_DIR"
    local nofile nproc
    nofile=$(ulimit -Hn); [ "$nofile" = unlimited ] && nofile=1048576
    nproc=$(ulimit -Hu); { [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
    {
        echo "# written by deploy/container/lib.sh"
        echo "[containers]"
        echo "default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]"
        # Build-time mounts only (containers.conf volumes apply to `podman build` RUN steps and are
        # never committed to the image): see build.sh.
        [ -n "${BUILD_VOLUMES:-}" ] && echo "volumes = [$BUILD_VOLUMES]"
        if [ -d /sys/fs/cgroup/unified ] && [ -d /sys/fs/cgroup/memory ]; then
            echo "[engine]"
            echo "runtime = \"runc\""
        fi
    } > "$conf"
    export CONTAINERS_CONF="$PWD/$conf"
}

image_exists() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }
