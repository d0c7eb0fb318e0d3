#!/usr/bin/env bash
# Build and tag the ztunnel-py image (Dockerfile) with docker, or podman/buildah through $CONTAINER_ENGINE.
#
#   scripts/build-image.sh [--bpf] [--tag TAG] [--repository REPO] [--push] [--kind-load CLUSTER]
#
#   --bpf              with bcc (python3-bpfcc) for eBPF redirection; the tag gets a -bpf suffix
#   --tag TAG          default: the version in pyproject.toml (the chart's appVersion), e.g. 0.1.0
#   --repository REPO  default: ztunnel-py (deploy/ uses that name; set image.repository / kustomize images)
#   --push             push REPO:TAG after the build
#   --kind-load NAME   load the image into the kind cluster NAME (vagrant/ does this with --tag dev)
#
# Needs a container engine that can build (docker with BuildKit, or podman); the project's own machines have
# none, so this script is exercised by vagrant/ and CI elsewhere, not by the test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENGINE="${CONTAINER_ENGINE:-docker}"
REPO=ztunnel-py
TAG=""
BPF=0
PUSH=0
KIND_CLUSTER=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bpf) BPF=1 ;;
    --tag) TAG="$2"; shift ;;
    --repository) REPO="$2"; shift ;;
    --push) PUSH=1 ;;
    --kind-load) KIND_CLUSTER="$2"; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if ! command -v "$ENGINE" >/dev/null 2>&1; then
  echo "error: no container engine '$ENGINE' on PATH; install docker or podman, or set CONTAINER_ENGINE" >&2
  exit 1
fi
if [ -z "$TAG" ]; then
  TAG="$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -n1)"
fi
[ "$BPF" = 1 ] && TAG="$TAG-bpf"
IMAGE="$REPO:$TAG"
echo "building $IMAGE (bcc: $BPF) with $ENGINE"
DOCKER_BUILDKIT=1 "$ENGINE" build --build-arg "WITH_BPF=$BPF" -t "$IMAGE" -f "$ROOT/Dockerfile" "$ROOT"
# Smoke checks on the result: the CLI runs, and the CNI plugin answers VERSION with an empty environment.
"$ENGINE" run --rm "$IMAGE" version
echo '{"cniVersion":"1.0.0"}' | "$ENGINE" run --rm -i --entrypoint /usr/bin/env "$IMAGE" -i CNI_COMMAND=VERSION /opt/ztunnel/cni/ztunnel-cni
if [ "$PUSH" = 1 ]; then
  "$ENGINE" push "$IMAGE"
fi
if [ -n "$KIND_CLUSTER" ]; then
  kind load docker-image "$IMAGE" --name "$KIND_CLUSTER"
fi
echo "built $IMAGE"
