#!/usr/bin/env bash
# make container: build the bento and an OCI image from it with `bentoml containerize`.
#   docker (where `docker info` succeeds): BentoML's standard recipe, python:3.11-slim, the CUDA torch
#     that requirements.txt pins (torch==2.13.0 on Linux x86-64 is the CUDA build on PyPI).
#   podman (Debian's podman/buildah; this machine has a docker client but no engine): the same recipe;
#     when python:3.11-slim cannot be pulled, on localhost/spo-serve-base:bookworm built by base.sh from
#     Debian packages; with CONTAINER_TORCH=cpu (podman's default) the CPU torch wheel this machine's pip
#     resolves, which keeps the test image small.
# Settings: see lib.sh. Prints the image's name last.
set -euo pipefail
cd "$(dirname "$0")/../.."
source deploy/container/lib.sh
pick_engine
[ -x "$BENTOML" ] || die "$BENTOML missing: run make install"
mkdir -p "$BUILD_DIR"
t_start=$(date +%s)

# -- base image -------------------------------------------------------------------------------------
base=${CONTAINER_BASE:-auto}
if [ "$base" = auto ]; then
    if image_exists "$STANDARD_BASE" || timeout 300 "$ENGINE" pull -q "$STANDARD_BASE" >/dev/null 2>&1; then
        base=standard
    else
        log "$STANDARD_BASE cannot be pulled (no image registry reachable): using a Debian-built base"
        base=debian
    fi
fi
case $base in
    standard) base_image= ;;
    debian)
        base_image=$BASE_IMAGE
        if ! image_exists "$BASE_IMAGE" || [ -n "${CONTAINER_REBUILD_BASE:-}" ]; then
            ENGINE=$ENGINE bash deploy/container/base.sh
        fi ;;
    *) die "CONTAINER_BASE must be auto, standard or debian, not $base" ;;
esac
t_base=$(date +%s)

# -- the torch build and the bentofile ------------------------------------------------------------------
bentofile=bentofile.yaml
variant_args=()
[ -n "$base_image" ] && variant_args+=(--base-image "$base_image")
wheels="$PWD/$BUILD_DIR/wheels"
if [ "$TORCH" = cpu ]; then
    [ "$ENGINE" = podman ] || die "CONTAINER_TORCH=cpu mounts the wheel into the build: use CONTAINER_ENGINE=podman"
    pin=$(grep -E '^torch==' requirements.txt | head -1)
    [ -n "$pin" ] || die "no torch== pin in requirements.txt"
    wheel=$(ls "$wheels"/torch-"${pin#torch==}"*.whl 2>/dev/null | head -1 || true)
    if [ -z "$wheel" ]; then
        rm -rf "$wheels"; mkdir -p "$wheels"
        log "pip download $pin (this machine's pip resolves the CPU build)"
        "$PYTHON" -m pip download -q --no-deps --only-binary=:all: "$pin" -d "$wheels"
        wheel=$(ls "$wheels"/torch-*.whl | head -1)
    fi
    case $wheel in *+cpu*) ;; *) log "warning: $(basename "$wheel") is not a +cpu build: the image gets that torch" ;; esac
    variant_args+=(--torch-wheel "$wheel")
fi
if [ ${#variant_args[@]} -gt 0 ]; then
    "$PYTHON" deploy/container/variant.py "$BUILD_DIR/variant" "${variant_args[@]}"
    bentofile="$BUILD_DIR/variant/bentofile.yaml"
fi

# -- bento --------------------------------------------------------------------------------------------
log "bentoml build -f $bentofile"
tag=$("$BENTOML" build -f "$bentofile" --output tag . | tail -1)
tag=${tag#__tag__:}
[[ $tag == spo-serve:* ]] || die "bentoml build printed no tag"
t_bento=$(date +%s)
# The image carries spo_runtime/model/weights.py: its `python -m spo_runtime download` (the Kubernetes init
# container, docs/deploy.md) fetches exactly these parts. Recorded beside the build (exit 2: a part is unpinned).
"$PYTHON" -m spo_runtime download --preset sdxl-spo --dry-run --json > "$BUILD_DIR/weights-plan.json" 2>/dev/null \
    || log "weights: a part is not pinned (spo_runtime/model/weights.py); plan in $BUILD_DIR/weights-plan.json"

# -- image --------------------------------------------------------------------------------------------
old_id=$("$ENGINE" image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
if [ "$ENGINE" = podman ]; then
    # Mounted into the build's RUN steps only, never committed to the image:
    # - the torch wheel directory, named by the variant's requirements (--find-links /opt/spo-wheels);
    # - this machine's CA bundle over the image's, so that pip and uv in the build trust what the host
    #   trusts (this machine reaches PyPI through a TLS-intercepting egress proxy whose CA only the host
    #   bundle holds; elsewhere it is the same Mozilla set the image has). CONTAINER_BUILD_CA= disables.
    vols=()
    ca=${CONTAINER_BUILD_CA-/etc/ssl/certs/ca-certificates.crt}
    [ -n "$ca" ] && [ -f "$ca" ] && vols+=("\"$(readlink -f "$ca"):/etc/ssl/certs/ca-certificates.crt:ro\"")
    [ "$TORCH" = cpu ] && vols+=("\"$wheels:/opt/spo-wheels:ro\"")
    BUILD_VOLUMES=$(IFS=,; echo "${vols[*]}") podman_settings containers-build.conf
fi
log "bentoml containerize $tag --backend $ENGINE -t $IMAGE"
"$BENTOML" containerize "$tag" --backend "$ENGINE" -t "$IMAGE"
t_image=$(date +%s)
new_id=$("$ENGINE" image inspect -f '{{.Id}}' "$IMAGE")
# The previous build of this name is now untagged: drop it (its layers shared with the new one stay).
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then "$ENGINE" rmi "$old_id" >/dev/null 2>&1 || true; fi
t_done=$(date +%s)

size=$("$ENGINE" image inspect -f '{{.Size}}' "$IMAGE")
cat > "$BUILD_DIR/last-build.json" <<EOF
{"image": "$IMAGE", "bento": "$tag", "engine": "$ENGINE", "base": "${base_image:-$STANDARD_BASE}", "torch": "$TORCH",
 "weights_plan": "$BUILD_DIR/weights-plan.json", "size_bytes": $size, "seconds": {"base": $((t_base - t_start)), "bento": $((t_bento - t_base)),
 "containerize": $((t_image - t_bento)), "remove_previous": $((t_done - t_image)), "total": $((t_done - t_start))}}
EOF
log "built $IMAGE ($((size / 1000000)) MB, $ENGINE, base ${base_image:-$STANDARD_BASE}, torch $TORCH) in $((t_done - t_start)) s"
echo "$IMAGE"
