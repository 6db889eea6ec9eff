#!/usr/bin/env bash
# make container-test: build the image if it is missing, run it with the tiny preset, wait for /readyz,
# send the README's curl and check the PNG, stop it with SIGTERM and check a clean exit (status 0).
# Also checks: the server runs as a non-root user, SPO_DATA_DIR is the mounted volume and what the
# server wrote there outlives the container, no model hub is needed (HF_HUB_OFFLINE=1).
# Traffic goes only to 127.0.0.1: the port is published on the loopback address alone.
# Settings: see lib.sh; CONTAINER_READY_S (default 600) bounds the wait for /readyz.
set -euo pipefail
cd "$(dirname "$0")/../.."
source deploy/container/lib.sh
pick_engine
need curl
OUT="$BUILD_DIR/test"
rm -rf "$OUT"; mkdir -p "$OUT"

if ! image_exists "$IMAGE"; then
    log "$IMAGE missing: building it (make container)"
    bash deploy/container/build.sh
    if [ "$ENGINE" = podman ]; then podman_settings; fi   # not build.sh's, which mount build-time volumes
fi

NAME="spo-serve-test-$$"
VOLUME="spo-serve-test-data-$$"
port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$port"
token=$("$PYTHON" -c 'import secrets; print(secrets.token_hex(16))')
cleanup() {
    "$ENGINE" logs "$NAME" > "$OUT/server.log" 2>&1 || true
    "$ENGINE" rm -f "$NAME" >/dev/null 2>&1 || true
    "$ENGINE" volume rm -f "$VOLUME" >/dev/null 2>&1 || true
}
trap cleanup EXIT
fail() { "$ENGINE" logs --tail 40 "$NAME" >&2 2>&1 || true; die "$*"; }

"$ENGINE" volume create "$VOLUME" >/dev/null
t0=$("$PYTHON" -c 'import time; print(time.time())')
"$ENGINE" run -d --name "$NAME" -p "127.0.0.1:$port:3000" -v "$VOLUME:/home/bentoml/data" \
    -e SPO_MODEL=tiny -e HF_HUB_OFFLINE=1 -e SPO_ADMIN_TOKEN="$token" "$IMAGE" >/dev/null
log "started $IMAGE as $NAME on $URL; waiting for /readyz"
deadline=$(( $(date +%s) + ${CONTAINER_READY_S:-600} ))
until [ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/readyz" || true)" = 200 ]; do
    [ "$("$ENGINE" inspect -f '{{.State.Running}}' "$NAME")" = true ] || fail "the container exited before /readyz"
    [ "$(date +%s)" -lt "$deadline" ] || fail "no 200 from /readyz within ${CONTAINER_READY_S:-600} s"
    sleep 0.5
done
ready_s=$("$PYTHON" -c "import time; print(f'{time.time() - $t0:.1f}')")
log "/readyz 200 after $ready_s s"

# The README's request, sent to the loopback address.
code=$(curl -s -X POST "$URL/generate" -H 'content-type: application/json' \
     -d '{"prompt": "a watercolor fox in a snowy forest", "seed": 42}' -D "$OUT/headers.txt" -o "$OUT/fox.png" \
     -w '%{http_code}')
[ "$code" = 200 ] || fail "POST /generate answered $code: $(head -c 300 "$OUT/fox.png")"
"$PYTHON" - "$OUT/fox.png" "$OUT/headers.txt" <<'EOF' || fail "the image is not the expected PNG"
import sys
from PIL import Image
png, headers = sys.argv[1], open(sys.argv[2]).read().lower()
assert "content-type: image/png" in headers, headers
assert "x-seed: 42" in headers, headers
with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n", "no PNG signature"
im = Image.open(png)
im.load()
assert im.format == "PNG" and im.size == (64, 64), (im.format, im.size)
lo, hi = zip(*im.convert("RGB").getextrema())
assert max(hi) - min(lo) > 0, "a blank image"
assert "a watercolor fox" in im.info.get("parameters", ""), im.info
EOF
log "POST /generate: 200, a 64x64 PNG with seed 42 and its parameters chunk"

# Non-root, and SPO_DATA_DIR is the volume.
uid=$("$ENGINE" exec "$NAME" id -u)
[ "$uid" != 0 ] || fail "the server runs as root"
data_dir=$("$ENGINE" exec "$NAME" sh -c 'echo "$SPO_DATA_DIR"')
mounts=$("$ENGINE" inspect -f '{{range .Mounts}}{{.Name}}={{.Destination}} {{end}}' "$NAME")
[[ " $mounts" == *" $VOLUME=$data_dir "* ]] || fail "SPO_DATA_DIR=$data_dir is not the volume ($mounts)"
"$ENGINE" exec "$NAME" sh -c 'test -w "$SPO_DATA_DIR" && test -n "$(ls -A "$SPO_DATA_DIR")"' \
    || fail "the server wrote nothing in SPO_DATA_DIR"

# SIGTERM (the stop signal): the server drains and exits with status 0 well before the kill timeout.
t1=$("$PYTHON" -c 'import time; print(time.time())')
"$ENGINE" stop -t 120 "$NAME" >/dev/null
stop_s=$("$PYTHON" -c "import time; print(f'{time.time() - $t1:.1f}')")
status=$("$ENGINE" inspect -f '{{.State.ExitCode}}' "$NAME")
[ "$status" = 0 ] || fail "exit status $status after SIGTERM (137: it had to be killed)"
log "SIGTERM: exited with status 0 after $stop_s s"

# What the server wrote outlives the container.
kept=$("$ENGINE" run --rm --entrypoint ls -v "$VOLUME:/data" "$IMAGE" -A /data | tr '\n' ' ')
[ -n "$kept" ] || die "the volume is empty after the container stopped"
log "the volume keeps: $kept"

size=$("$ENGINE" image inspect -f '{{.Size}}' "$IMAGE")
cat > "$OUT/result.json" <<EOF
{"image": "$IMAGE", "engine": "$ENGINE", "size_bytes": $size, "ready_s": $ready_s, "stop_s": $stop_s, "uid": $uid}
EOF
log "PASS: $IMAGE ($((size / 1000000)) MB) ready in $ready_s s, PNG ok, uid $uid, volume kept, clean exit"
