#!/bin/sh
# Container entrypoint: run the command as PUID:PGID, as the linuxserver.io images do, so files in
# the data and keys volumes get the owner the host expects and the service never runs as root.
#
# Started as root (the default): give the `sftpgate` user PUID/PGID, hand the volumes to it, then
# drop root for good with setpriv (util-linux, already in the base image: nothing to install).
# Started as another user (`docker run --user`, rootless runtimes): run the command as that user.
set -eu

PUID="${PUID:-1000}"
PGID="${PGID:-1000}"
# Folders handed to PUID:PGID before the switch; set it to "" to leave ownership alone.
SFTPGATE_CHOWN="${SFTPGATE_CHOWN-/data /keys}"

if [ "$(id -u)" != "0" ]; then
  exec "$@"
fi

case "$PUID:$PGID" in
  *[!0-9:]* | :* | *:) echo "sftpgate: PUID and PGID must be numbers (got $PUID:$PGID)" >&2; exit 2 ;;
esac

# Keep the user's entry in step with the ids, so the process has a name (ps, ls -l, libraries
# that look the user up). -o: the ids may already belong to an account of the image.
if [ "$(getent group sftpgate | cut -d: -f3)" != "$PGID" ]; then
  groupmod -o -g "$PGID" sftpgate
fi
if [ "$(getent passwd sftpgate | cut -d: -f3,4)" != "$PUID:$PGID" ]; then
  usermod -o -u "$PUID" -g "$PGID" sftpgate
fi

# Only what is not owned yet (first start, a changed PUID, a file a root `docker exec` left):
# the data folder holds the ledger and files still on their way, never the whole library.
for dir in $SFTPGATE_CHOWN; do
  if [ -d "$dir" ]; then
    find "$dir" \( ! -user "$PUID" -o ! -group "$PGID" \) -exec chown -h "$PUID:$PGID" {} +
  fi
done

exec setpriv --reuid="$PUID" --regid="$PGID" --clear-groups -- "$@"
