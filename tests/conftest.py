"""Shared fixtures: the real media corpus from ../shared/corpus, read in place."""

from __future__ import annotations

import contextlib
import csv
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not (CORPUS / "MANIFEST.tsv").is_file():
        pytest.skip(
            f"media corpus not found at {CORPUS} (expected ../shared/corpus beside the repo)"
        )
    return CORPUS


@pytest.fixture(scope="session")
def manifest(corpus: Path) -> dict[str, dict[str, str]]:
    with (corpus / "MANIFEST.tsv").open(newline="") as f:
        return {row["file"]: row for row in csv.DictReader(f, delimiter="\t")}


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """The loop the service runs on (`sftpgate serve` uses uvloop): its transports are not
    asyncio's classes, and code that assumes they are fails only there."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop}


# -- a running sftpgate beside a stand-in Immich, both in this test's event loop ----------------

API_KEY = "test-api-key-0123456789"
PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="session")
def host_keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One set of host keys for the whole run: RSA key generation is slow."""
    return tmp_path_factory.mktemp("host-keys")


@pytest.fixture(scope="session")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ed25519 client key in OpenSSH format, usable by `sftp -i` and by asyncssh."""
    import asyncssh

    path = tmp_path_factory.mktemp("client-key") / "id_ed25519"
    key = asyncssh.generate_private_key("ssh-ed25519", comment="phone")
    path.write_bytes(key.export_private_key())
    path.chmod(0o600)
    path.with_suffix(".pub").write_bytes(key.export_public_key())
    return path


@pytest.fixture
async def standin(tmp_path: Path):
    from sftpgate.immich.standin import StandinState, start_standin

    state = StandinState(storage_dir=tmp_path / "immich-storage")
    state.add_user(API_KEY)
    server = await start_standin(state)
    try:
        yield server
    finally:
        await server.close()


def gate_config(
    tmp_path: Path, immich_url: str, host_keys_dir: Path, client_key: Path, **sections: dict
) -> Path:
    """Write a test config: loopback ports chosen by the OS, short retry and scan intervals."""
    import yaml

    doc: dict = {
        "data_dir": str(tmp_path / "data"),
        "timezone": "Europe/Berlin",
        "immich": {"url": immich_url, "api_key": API_KEY},
        "sftp": {
            "listen": "127.0.0.1:0",
            "host_keys_dir": str(host_keys_dir),
            "users": [
                {
                    "name": "phone",
                    "password": PASSWORD,
                    "authorized_keys": [client_key.with_suffix(".pub").read_text().strip()],
                }
            ],
        },
        "metrics": {"listen": "127.0.0.1:0"},
        "optimize": {"workers": 2},
        "retry": {"first_delay_seconds": 0.2, "max_delay_seconds": 1, "ping_interval_seconds": 0.2},
        "watch": {"settle_seconds": 0.3, "scan_interval_seconds": 0.2},
    }
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@contextlib.asynccontextmanager
async def started_gate(
    tmp_path: Path, standin, host_keys_dir: Path, client_key: Path, **sections: dict
) -> AsyncIterator:
    """A started service with the test config, its `sections` laid over it."""
    from sftpgate.config import load_config
    from sftpgate.server import Service

    config = gate_config(tmp_path, standin.url, host_keys_dir, client_key, **sections)
    service = Service(load_config(config))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.fixture
async def gate(tmp_path: Path, standin, host_keys_dir: Path, client_key: Path):
    """A started service with the default test config."""
    async with started_gate(tmp_path, standin, host_keys_dir, client_key) as service:
        yield service


async def eventually(condition, timeout: float = 30.0, what: str = "condition"):
    """Poll a cheap condition until it holds (for effects with no event to await, such as the
    server noticing a dropped connection); fail with `what` after `timeout`."""
    import asyncio
    import inspect
    import time

    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def finished(n: int):
    """A pipeline.wait_for condition: n originals done or undone."""
    return lambda c: c.get("done", 0) + c.get("undone", 0) >= n
