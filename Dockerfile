# One image for every Tapestry role (coordinator, jurisdiction nodes, CLI); compose picks
# the role with `command:`, e.g. `tapestry node serve --config /etc/tapestry/nodes/vietnam.toml`.
#
# Fully offline: everything comes from build/wheelhouse (scripts/fill-wheelhouse), installed
# with --no-index, so the build never touches a package index or an image registry.
# BASE_IMAGE is any Debian-like image whose `python3` is CPython 3.11 with the venv module:
#   python:3.11-slim            (the default here; needs a reachable registry)
#   tapestry-base:bookworm      (scripts/build-base-image: debootstrap + docker import;
#                                what docker-compose.yml passes)
# Works with the classic builder (docker 20.10 / docker-compose v1) and with BuildKit.
ARG BASE_IMAGE=python:3.11-slim

# --- stage 1: the dependencies (torch & co.) in a virtualenv ---------------------------------
# A separate stage so the ~220 MB of wheels never become a layer of the final image. Only the
# dependency wheels and requirements.txt are copied here, not the project wheel, so this stage
# stays cached across code changes (torch is not reinstalled for every edit).
FROM ${BASE_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY build/wheelhouse/requirements.txt build/wheelhouse/*.whl /wheels/
RUN python3 -m venv /opt/tapestry \
 && /opt/tapestry/bin/pip install --no-index --find-links /wheels -r /wheels/requirements.txt \
 && rm -rf /wheels

# --- stage 2: runtime -----------------------------------------------------------------------
FROM ${BASE_IMAGE}
ENV LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/tapestry/bin:$PATH \
    HOME=/home/tapestry
# Same base image and same path as stage 1, so the venv (absolute shebangs, symlinked
# interpreter) works as copied.
COPY --from=deps /opt/tapestry /opt/tapestry
# Unprivileged user; /var/lib/tapestry is owned by it so that named volumes mounted there
# start out writable (docker copies the ownership of the image's directory into a new volume).
RUN groupadd --gid 10001 tapestry \
 && useradd --uid 10001 --gid tapestry --home-dir /home/tapestry --create-home \
      --shell /usr/sbin/nologin tapestry \
 && mkdir -p /var/lib/tapestry /etc/tapestry \
 && chown tapestry:tapestry /var/lib/tapestry
# The project itself: a small layer of its own. --no-deps + `pip check`: every requirement
# must already be satisfied by stage 1, offline.
COPY build/wheelhouse/project/ /tmp/project/
RUN /opt/tapestry/bin/pip install --no-index --no-deps /tmp/project/tapestry_consortium-*.whl \
 && /opt/tapestry/bin/pip check \
 && rm -rf /tmp/project \
 && /opt/tapestry/bin/python -c "import torch, grpc, safetensors, pydantic, tapestry.cli; print('torch', torch.__version__)"
USER tapestry
WORKDIR /home/tapestry
# gRPC: coordinator 50051, nodes 50061 (documentation only; compose sets --listen).
EXPOSE 50051 50061
# No ENTRYPOINT: compose `command:` lines spell the full `tapestry ...` command.
CMD ["tapestry", "--help"]
