# sftpgate: one container beside Immich.
#
#   docker build -t sftpgate .
#   docker run -d -p 2222:2222 -e SFTPGATE_IMMICH_API_KEY=... -e SFTPGATE_SFTP_PASSWORD=... \
#     -v ./sftpgate-data:/data -v ./sftpgate-keys:/keys --network immich_default sftpgate
#
# Two stages: the package is installed into a venv in the first and only that venv is copied
# into the second, so neither pip's build files nor the source tree end up in the image.

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY sftpgate ./sftpgate
# The README's install (a venv, then pip install), without -e: the image holds the package, not
# a link to a source tree. Every dependency is a wheel, so no compiler is needed.
RUN python3 -m venv /opt/sftpgate && /opt/sftpgate/bin/pip install .


FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/sftpgate/bin:$PATH \
    PUID=1000 \
    PGID=1000
# The unprivileged user the service runs as. The entrypoint gives it PUID/PGID (as the
# linuxserver.io images do), so files in the volumes get the owner the host expects. Its home does
# not exist on purpose: usermod would otherwise re-own whatever is there.
RUN groupadd --gid 1000 sftpgate \
 && useradd --uid 1000 --gid sftpgate --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin sftpgate \
 && mkdir -p /data /keys /config \
 && chown sftpgate:sftpgate /data /keys
COPY --from=build /opt/sftpgate /opt/sftpgate
COPY --chmod=0755 deploy/entrypoint.sh /usr/local/bin/sftpgate-entrypoint
# The configuration that reads everything from SFTPGATE_* variables (no YAML needed); mount your
# own file over /config/config.yaml for the rest. The example documents every key.
COPY deploy/config.yaml /config/config.yaml
COPY config.yaml.example /config/config.yaml.example
# `sftpgate --config` defaults to ./config.yaml: every command, also `docker compose run ...
# sftpgate import`, finds the configuration without being told.
WORKDIR /config

VOLUME ["/data", "/keys"]
# 2222: SFTP (publish it). 9090: /metrics, /healthz, /readyz (keep it on the internal network).
EXPOSE 2222 9090
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=4)"]
# The service parks work in flight and stops within seconds on SIGTERM; give
# `docker stop` a --time of 30 s or more for large uploads in flight.
STOPSIGNAL SIGTERM
ENTRYPOINT ["sftpgate-entrypoint"]
CMD ["sftpgate", "serve"]
