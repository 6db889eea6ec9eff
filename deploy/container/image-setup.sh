#!/bin/sh
# bentofile.yaml docker.setup_script: runs as root while the image is built, after the Python packages.
# It creates the server's state directories owned by the non-root user the server runs as (bentoml),
# so that a volume mounted on SPO_DATA_DIR is writable: docker and podman give a new named volume the
# owner of the image directory it is mounted on (a host directory mounted with -v must be chowned to
# the user's uid, see deploy/container/README.md).
set -eu
for d in "${SPO_DATA_DIR:?}" "${HF_HOME:?}"; do
    mkdir -p "$d"
    chown bentoml:bentoml "$d"
    chmod 0750 "$d"
done
