# sftpgate: one container beside Immich.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

# gosu drops root after the entrypoint has given the data volume to PUID:PGID.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gosu \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY sftpgate ./sftpgate
# The README's install command; every dependency is a wheel, so no build tools are needed.
RUN pip install . && useradd --uid 1000 --user-group --no-create-home --shell /usr/sbin/nologin sftpgate

COPY deploy/entrypoint.sh /usr/local/bin/sftpgate-entrypoint
COPY config.yaml.example /app/config.yaml.example

ENV PUID=1000 PGID=1000
VOLUME ["/data", "/keys"]
EXPOSE 2222 9090
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=4)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["sftpgate-entrypoint"]
CMD ["sftpgate", "--config", "/config/config.yaml", "serve"]
