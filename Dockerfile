# syntax=docker/dockerfile:1
# ztunnel-py: one image for every component (node proxy, node agent, CNI installer + plugin, CA, waypoint).
#
#   scripts/build-image.sh            -> ztunnel-py:<version>        (iptables redirection)
#   scripts/build-image.sh --bpf      -> ztunnel-py:<version>-bpf    (+ bcc, for node.redirectMode: ebpf)
#
# Stages: `wheels` builds the project's dependency wheels; `compiled` the mypyc build of the hot modules
# (scripts/build-compiled.sh; the final stage checks it is used); `cni` builds the CNI plugin as the self-contained
# executable of cni/build.sh (PyInstaller: the runtime runs it on the node, which has no Python); the final
# stage is a slim Debian with python3, iptables and iproute2, the venv, and the plugin at
# /opt/ztunnel/cni/ztunnel-cni (the installer copies it to the node's CNI bin dir).
ARG DEBIAN=debian:bookworm-slim

FROM ${DEBIAN} AS wheels
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ztunnel ./ztunnel
# Wheels of the dependencies only (the project itself is installed editable in the final stage, see there).
RUN python3 -m venv /tmp/v && /tmp/v/bin/pip install --no-cache-dir --upgrade pip \
 && /tmp/v/bin/pip wheel --no-cache-dir --wheel-dir /wheels . \
 && rm -f /wheels/ztunnel_py-*.whl

# The hot modules compiled with mypyc (ztunnel/compiled; scripts/build-compiled.sh): built against the project's
# dependencies for their types, with the same Debian python3 as the final stage (the build names its interpreter,
# and the loader refuses a build for another one). mypy and the compiler stay in this stage.
FROM ${DEBIAN} AS compiled
ARG MYPY_VERSION=2.4.1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=wheels /wheels /tmp/wheels
RUN python3 -m venv /tmp/v \
 && /tmp/v/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels /tmp/wheels/*.whl \
 && /tmp/v/bin/pip install --no-cache-dir "mypy==$MYPY_VERSION" setuptools
WORKDIR /src
COPY ztunnel ./ztunnel
COPY scripts/build-compiled.sh ./scripts/
RUN PYTHON=/tmp/v/bin/python bash scripts/build-compiled.sh

FROM ${DEBIAN} AS cni
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip binutils ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY cni ./cni
COPY ztunnel/__init__.py ./ztunnel/__init__.py
COPY ztunnel/cni ./ztunnel/cni
# cni/build.sh installs its pinned PyInstaller into its own build venv and ends with the `env -i` smoke check.
RUN PYTHON=python3 CNI_BUILD_VENV=/tmp/cni-build-venv bash cni/build.sh /out

FROM ${DEBIAN}
ARG WITH_BPF=0
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv iptables iproute2 ca-certificates \
 && if [ "$WITH_BPF" = 1 ]; then apt-get install -y --no-install-recommends python3-bpfcc; fi \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1337 ztunnel && useradd --uid 1337 --gid 1337 --no-create-home --shell /usr/sbin/nologin ztunnel
# The source tree stays whole (ztunnel/ next to bpf/: the eBPF loader compiles bpf/redirect.c relative to
# the package), installed editable into the venv; with bcc the venv sees Debian's python3-bpfcc.
COPY --from=wheels /wheels /tmp/wheels
COPY pyproject.toml README.md /opt/ztunnel/app/
COPY ztunnel /opt/ztunnel/app/ztunnel
COPY bpf /opt/ztunnel/app/bpf
COPY --from=compiled /src/build/compiled /opt/ztunnel/app/build/compiled
RUN if [ "$WITH_BPF" = 1 ]; then SITE=--system-site-packages; else SITE=; fi \
 && python3 -m venv $SITE /opt/ztunnel \
 && /opt/ztunnel/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels /tmp/wheels/*.whl \
 && /opt/ztunnel/bin/pip install --no-cache-dir --no-deps -e /opt/ztunnel/app \
 && rm -rf /tmp/wheels \
 && find /opt/ztunnel -name __pycache__ -prune -exec rm -rf {} + \
 && /opt/ztunnel/bin/python -m compileall -q /opt/ztunnel/app/ztunnel \
 && /opt/ztunnel/bin/python -m ztunnel.compiled status | tee /dev/stderr | grep -q '^compiled '
COPY --from=cni /out/ztunnel-cni /opt/ztunnel/cni/ztunnel-cni
ENV PATH=/opt/ztunnel/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# Non-root by default (the CA and waypoints run so); the node DaemonSet's containers run as root with only
# the capabilities each needs (deploy/).
USER 1337:1337
ENTRYPOINT ["ztunnel"]
CMD ["--help"]
