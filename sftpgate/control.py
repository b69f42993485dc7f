"""The control socket: how a command asks the running service to change its ledger.

Only one process writes the ledger and watch/ at a time — the one that holds the data folder's
lock (`serve` or `import`). A command that would write (`sftpgate retry`) takes the lock itself
when no service runs, and otherwise sends its request here, so the service makes the change on its
own ledger thread and wakes its pipeline. `<data_dir>/sftpgate.sock` is a Unix socket readable
only by the service's own user; a request is one JSON line, the answer one JSON line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from .logs import event

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
_MAX_REQUEST = 1 << 20
TIMEOUT_SECONDS = 60.0


@contextlib.contextmanager
def _addressable(path: Path) -> Iterator[str]:
    """A name for `path` that fits a Unix socket address (108 bytes): deep data folders go
    through a descriptor of their folder, which Linux resolves at bind and connect."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class ControlServer:
    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        # A socket file left by a killed service: whoever holds the lock owns the name.
        self.path.unlink(missing_ok=True)
        with _addressable(self.path) as address:
            self._server = await asyncio.start_unix_server(
                self._serve, path=address, limit=_MAX_REQUEST
            )
        os.chmod(self.path, 0o600)  # the service's own user only (a umask is process-wide)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await reader.readline())
            handler = self.handlers.get(request.get("command", ""))
            if handler is None:
                reply: dict[str, Any] = {"error": f"unknown command {request.get('command')!r}"}
            else:
                reply = await handler(request)
        except (ValueError, AttributeError) as exc:
            reply = {"error": f"malformed request: {exc}"}
        except Exception as exc:  # the command failed: tell the caller, keep serving
            event("control request failed", level=40, error=repr(exc))
            reply = {"error": repr(exc)}
        with contextlib.suppress(OSError):
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
            writer.close()


def ask_service(path: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    """Send one request to the running service; None when no service listens there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT_SECONDS)
        try:
            with _addressable(path) as address:
                sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        sock.sendall(json.dumps(request).encode() + b"\n")
        with sock.makefile("rb") as answer:
            line = answer.readline()
    if not line:
        raise ConnectionError("the service closed the control socket without answering")
    reply: dict[str, Any] = json.loads(line)
    if "error" in reply:
        raise RuntimeError(reply["error"])
    return reply
