#!/usr/bin/env bash
# Provision the e2e VM (as root): Docker, kind and kubectl, the ztunnel-py image (tag dev) loaded into a kind
# cluster with two workers, and deploy/overlays/dev (or overlays/ebpf with REDIRECT=ebpf) installed.
# Idempotent: a second run rebuilds the image and re-applies the install on the same cluster.
set -euo pipefail
SRC=/ztunnel-py
CLUSTER=ztunnel
KIND_VERSION="${KIND_VERSION:-v0.27.0}"
KUBECTL_VERSION="${KUBECTL_VERSION:-v1.32.2}"
REDIRECT="${REDIRECT:-iptables}"
ARCH="$(dpkg --print-architecture)"   # amd64 | arm64

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends docker.io curl ca-certificates python3 python3-venv python3-pip git
systemctl enable --now docker
usermod -aG docker vagrant

fetch() {  # URL DEST: download and check against the .sha256 published beside it
  curl -fsSL -o "$2" "$1"
  echo "$(curl -fsSL "$1.sha256" | awk '{print $1}')  $2" | sha256sum -c -
}
if ! kind version 2>/dev/null | grep -q "$KIND_VERSION"; then
  fetch "https://kind.sigs.k8s.io/dl/$KIND_VERSION/kind-linux-$ARCH" /usr/local/bin/kind
  chmod 755 /usr/local/bin/kind
fi
if ! kubectl version --client 2>/dev/null | grep -q "$KUBECTL_VERSION"; then
  fetch "https://dl.k8s.io/release/$KUBECTL_VERSION/bin/linux/$ARCH/kubectl" /usr/local/bin/kubectl
  chmod 755 /usr/local/bin/kubectl
fi
# inotify limits kind's nodes need (systemd inside each node container)
sysctl -w fs.inotify.max_user_watches=524288 fs.inotify.max_user_instances=512

if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --config "$SRC/vagrant/kind-config.yaml" --wait 180s
fi
install -d -o vagrant -g vagrant /home/vagrant/.kube
kind get kubeconfig --name "$CLUSTER" > /home/vagrant/.kube/config
chown vagrant:vagrant /home/vagrant/.kube/config
export KUBECONFIG=/home/vagrant/.kube/config

# The image, loaded into every node (so never pulled), and the install: CRDs (a fresh cluster: the
# overlay's crds component), RBAC, CA, node DaemonSet. iptables: overlays/dev (ztunnel-py:dev, debug logs);
# ebpf: overlays/ebpf (the node DaemonSet on ztunnel-py:<version>-bpf, with bcc; the kind nodes share the VM's
# kernel and bpffs; the CA on the plain ztunnel-py:<version>, so both are loaded).
if [ "$REDIRECT" = ebpf ]; then
  bash "$SRC/scripts/build-image.sh" --kind-load "$CLUSTER"
  bash "$SRC/scripts/build-image.sh" --bpf --kind-load "$CLUSTER"
  kubectl apply --server-side -k "$SRC/deploy/overlays/ebpf"
else
  bash "$SRC/scripts/build-image.sh" --tag dev --kind-load "$CLUSTER"
  kubectl apply --server-side -k "$SRC/deploy/overlays/dev"
fi
kubectl -n istio-system rollout status deployment/ztunnel-ca --timeout=300s
kubectl -n istio-system rollout status daemonset/ztunnel --timeout=300s
# Every node's primary conflist now ends with the plugin.
for node in $(kind get nodes --name "$CLUSTER"); do
  docker exec "$node" sh -c 'grep -l "\"ztunnel-cni\"" /etc/cni/net.d/*.conflist' >/dev/null \
    || { echo "error: ztunnel-cni is not chained on $node" >&2; exit 1; }
  docker exec "$node" test -x /opt/cni/bin/ztunnel-cni
done
echo "provisioned: kind cluster $CLUSTER with ztunnel-py (redirect: $REDIRECT); KUBECONFIG=$KUBECONFIG"
