#!/bin/sh
# Run sftpgate as PUID:PGID (like linuxserver.io images) so files in the volumes get the owner
# the host expects; the data and keys volumes are handed to that user first.
set -eu
if [ "$(id -u)" = "0" ]; then
  groupmod -o -g "${PGID:-1000}" sftpgate
  usermod -o -u "${PUID:-1000}" sftpgate
  for dir in /data /keys; do
    [ -d "$dir" ] && chown sftpgate:sftpgate "$dir"
  done
  exec gosu sftpgate "$@"
fi
exec "$@"
