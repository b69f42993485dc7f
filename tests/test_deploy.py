"""Deployment files: Dockerfile, entrypoint, compose, dashboard.

No container engine runs here, so the Dockerfile is read as a structure and checked against the
README, pyproject.toml and the CLI; the entrypoint really runs (as root, with the real setpriv)
and really switches to PUID:PGID; the compose file and the configuration baked into the image are
loaded by the same code the service uses; the dashboard's queries are checked against the
/metrics of a running service.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from sftpgate.config import load_config, parse_listen
from sftpgate.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"


# -- Dockerfile -------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """[(INSTRUCTION, arguments)] per stage, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    stages: list[list[tuple[str, str]]] = []
    for line in logical:
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        stages[-1].append((word.upper(), rest.strip()))
    return stages


def instructions(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [args for word, args in stage if word == name]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"exec form expected: {args}"
    return value


def test_dockerfile_slim_base_ports_volumes_healthcheck_and_stop_signal():
    stages = dockerfile_stages()
    for stage in stages:
        (base,) = instructions(stage, "FROM")
        assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?( AS \w+)?", base), base
    final = stages[-1]
    assert instructions(final, "EXPOSE") == ["2222 9090"]
    (volumes,) = instructions(final, "VOLUME")
    assert set(exec_form(volumes)) == {"/data", "/keys"}
    (health,) = instructions(final, "HEALTHCHECK")
    assert "CMD" in health and "127.0.0.1:9090/healthz" in health
    assert instructions(final, "STOPSIGNAL") == ["SIGTERM"]
    # The baked-in configuration listens where EXPOSE and HEALTHCHECK say.
    config = yaml.safe_load((ROOT / "deploy" / "config.yaml").read_text())
    assert parse_listen(config["sftp"]["listen"])[1] == 2222
    assert parse_listen(config["metrics"]["listen"]) == ("0.0.0.0", 9090)
    assert config["data_dir"] == "/data" and config["sftp"]["host_keys_dir"] == "/keys"


def test_dockerfile_runs_as_an_unprivileged_user_with_puid_and_pgid():
    final = dockerfile_stages()[-1]
    env = " ".join(instructions(final, "ENV"))
    assert "PUID=" in env and "PGID=" in env
    runs = " ".join(instructions(final, "RUN"))
    assert re.search(r"useradd .*sftpgate", runs) and "groupadd" in runs
    (entry,) = instructions(final, "ENTRYPOINT")
    (target,) = exec_form(entry)
    copies = [shlex.split(c) for c in instructions(final, "COPY")]
    assert any(c[-2:] == ["deploy/entrypoint.sh", f"/usr/local/bin/{target}"] for c in copies)
    assert "--chmod=0755" in next(c for c in copies if c[-1].endswith(target))
    # No USER line: the entrypoint starts as root only to hand the volumes over, then drops root.
    assert 'setpriv --reuid="$PUID" --regid="$PGID"' in ENTRYPOINT.read_text()


def test_dockerfile_installs_the_readme_way_and_leaves_no_build_tools():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"python3 -m venv (\S+) && \1/bin/pip install -e \.", readme)
    assert m, "the README's install command"
    build, final = dockerfile_stages()[0], dockerfile_stages()[-1]
    installs = [r for r in instructions(build, "RUN") if "pip install" in r]
    assert len(installs) == 1
    venv = re.fullmatch(r"python3 -m venv (\S+) && \1/bin/pip install \.", installs[0])
    assert venv, f"not the README's command: {installs[0]}"
    # The same command but -e: an image holds the package, not a link to a source tree.
    assert m.group(0).replace(m.group(1), venv.group(1)).replace("-e .", ".") == installs[0]
    assert any(
        c == f"--from=build {venv.group(1)} {venv.group(1)}" for c in instructions(final, "COPY")
    )
    env = " ".join(instructions(final, "ENV"))
    assert f"PATH={venv.group(1)}/bin:$PATH" in env
    # Nothing is installed with apt in either stage (wheels only; setpriv is in the base image),
    # and the final stage gets no pip run at all.
    for stage in (build, final):
        assert not any("apt-get" in r or "apk " in r for r in instructions(stage, "RUN"))
    assert not any("pip" in r for r in instructions(final, "RUN"))
    # What pip needs to build the package is copied into the build stage.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = {p for c in instructions(build, "COPY") for p in shlex.split(c)[:-1]}
    assert project["project"]["readme"] in copied and "pyproject.toml" in copied
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in copied


def test_dockerfile_copies_exist_and_the_cli_finds_the_baked_in_config():
    final = dockerfile_stages()[-1]
    for stage in dockerfile_stages():
        for copy in instructions(stage, "COPY"):
            parts = [p for p in shlex.split(copy) if not p.startswith("--")]
            if "--from=" not in copy:
                for src in parts[:-1]:
                    assert (ROOT / src).exists(), f"COPY source missing: {src}"
    copies = [shlex.split(c) for c in instructions(final, "COPY")]
    (config_dst,) = [c[-1] for c in copies if c[-2] == "deploy/config.yaml"]
    (workdir,) = instructions(final, "WORKDIR")
    # `sftpgate CMD` without --config reads ./config.yaml: that is the baked-in file.
    default = build_parser().parse_args(["serve"]).config
    assert f"{workdir}/{default}" == config_dst
    (cmd,) = instructions(final, "CMD")
    program, *args = exec_form(cmd)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert program in project["project"]["scripts"] and args == ["serve"]


def test_baked_in_config_is_complete_with_two_variables_and_names_what_is_missing(tmp_path):
    path = ROOT / "deploy" / "config.yaml"
    config = load_config(
        path, env={"SFTPGATE_IMMICH_API_KEY": "k", "SFTPGATE_SFTP_PASSWORD": "secret"}
    )
    assert config.immich.url == "http://immich-server:2283"
    assert [(u.name, u.password) for u in config.sftp.users] == [("phone", "secret")]
    assert config.data_path == Path("/data")
    from sftpgate.config import ConfigError

    with pytest.raises(ConfigError) as missing:
        load_config(path, env={"SFTPGATE_SFTP_PASSWORD": "secret"})
    assert any(p.startswith("immich.api_key:") for p in missing.value.problems)


# -- entrypoint ---------------------------------------------------------------------------------


def test_entrypoint_is_valid_posix_sh():
    subprocess.run(["sh", "-n", str(ENTRYPOINT)], check=True)


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A folder the switched-to user can reach (pytest's own tmp folders are root-only)."""
    path = Path(tempfile.mkdtemp(prefix="sftpgate-entrypoint-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def fake_account_tools(bin_dir: Path, log: Path) -> None:
    """groupmod/usermod that record their arguments: the real ones would edit this machine's
    /etc/passwd. Everything else (getent, find, chown, setpriv) is real."""
    bin_dir.mkdir()
    for tool in ("groupmod", "usermod"):
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\n')
        script.chmod(0o755)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root, as in the container")
def test_entrypoint_hands_volumes_to_puid_pgid_and_really_drops_root(world_dir: Path):
    data, keys, root_only = world_dir / "data", world_dir / "keys", world_dir / "root-only"
    for d in (data / "watch" / "phone", keys, root_only):
        d.mkdir(parents=True)
    (data / "sftpgate.db").write_bytes(b"ledger")
    (keys / "ssh_host_ed25519_key").write_bytes(b"key")
    (keys / "ssh_host_ed25519_key").chmod(0o600)
    log = world_dir / "account-tools.log"
    fake_account_tools(world_dir / "bin", log)
    env = {
        "PATH": f"{world_dir / 'bin'}:{os.environ['PATH']}",
        "PUID": "4321",
        "PGID": "4322",
        "SFTPGATE_CHOWN": f"{data} {keys}",
    }
    probe = (
        'id -u; id -g; id -G; cat "$1/ssh_host_ed25519_key"; echo; touch "$2/created";'
        ' touch "$3/x" 2>/dev/null && echo "still root" || echo "root dropped"'
    )
    result = subprocess.run(
        ["sh", str(ENTRYPOINT), "sh", "-c", probe, "_", str(keys), str(data), str(root_only)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n") == ["4321", "4322", "4322", "key", "root dropped", ""]
    for path in [data, keys, *data.rglob("*"), *keys.rglob("*")]:
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (4321, 4322), path
    assert (data / "created").stat().st_uid == 4321, "the command itself runs as PUID"
    assert root_only.stat().st_uid == 0, "only the volumes are handed over"
    assert log.read_text().splitlines() == [
        "groupmod -o -g 4322 sftpgate",
        "usermod -o -u 4321 -g 4322 sftpgate",
    ]

    # Already started as a user (docker run --user): nothing to change, the command just runs.
    log.unlink()
    as_user = subprocess.run(
        ["setpriv", "--reuid=4321", "--regid=4322", "--clear-groups", "--",
         "sh", str(ENTRYPOINT), "id", "-u"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert as_user.returncode == 0 and as_user.stdout == "4321\n", as_user.stderr
    assert not log.exists()

    bad = subprocess.run(
        ["sh", str(ENTRYPOINT), "true"],
        env={**env, "PUID": "abc"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "PUID and PGID must be numbers" in bad.stderr


# -- compose, .env ------------------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.example.yml").read_text())


def env_example() -> dict[str, str]:
    out = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def test_compose_sits_beside_immich_on_its_network_with_secrets_from_env():
    doc = compose()
    svc = doc["services"]["sftpgate"]
    assert "immich-server" in svc["depends_on"]
    assert svc["networks"] == ["default"] and "default" in doc["networks"]
    env = svc["environment"]
    assert env["SFTPGATE_IMMICH_URL"] == "http://immich-server:2283"
    assert env["SFTPGATE_IMMICH_API_KEY"].startswith("${IMMICH_API_KEY:?")
    assert env["SFTPGATE_SFTP_PASSWORD"].startswith("${SFTP_PASSWORD:?")
    dotenv = env_example()
    assert "IMMICH_API_KEY" in dotenv and "SFTP_PASSWORD" in dotenv
    # COMPOSE_FILE makes plain `docker compose` commands see Immich's file and this one.
    assert dotenv["COMPOSE_FILE"].split(":") == [
        "docker-compose.yml",
        "docker-compose.sftpgate.yml",
    ]
    assert "docker-compose.sftpgate.yml" in (ROOT / "docker-compose.example.yml").read_text()
    targets = {v.rsplit(":", 1)[-1] for v in svc["volumes"]}
    assert {"/data", "/keys"} <= targets
    assert all(not v.startswith("/") for v in svc["volumes"]), "host folders beside the file"


def test_compose_publishes_sftp_and_keeps_metrics_internal():
    svc = compose()["services"]["sftpgate"]
    published = [str(p).rsplit(":", 1)[-1] for p in svc["ports"]]
    assert published == ["2222"]
    assert "9090" not in " ".join(map(str, svc["ports"]))
    assert "9090" in svc["expose"]
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"{svc['container_name']}:9090"]


def test_compose_environment_drives_the_baked_in_config(tmp_path):
    """Every variable the image's config needs is set by compose; none set there is unused."""
    env = compose()["services"]["sftpgate"]["environment"]
    text = (ROOT / "deploy" / "config.yaml").read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    read = set(re.findall(r"\$\{(SFTPGATE_\w+)", body))
    required = set(re.findall(r"\$\{(SFTPGATE_\w+)\}", body))
    given = {k for k in env if k.startswith("SFTPGATE_")}
    assert required <= given and given <= read
    # Resolve compose's ${VAR...} from a filled-in .env, then load as the container would.
    dotenv = {
        **env_example(),
        "IMMICH_API_KEY": "key-123",
        "SFTP_PASSWORD": "pw",
        "SFTPGATE_NOTIFY_WEBHOOK": "https://ntfy.sh/topic",
        "SFTPGATE_NOTIFY_SMTP_HOST": "smtp.example.org",
        "SFTPGATE_NOTIFY_SMTP_FROM": "sftpgate@example.org",
        "SFTPGATE_NOTIFY_SMTP_TO": "me@example.org",
        "SFTPGATE_SFTP_BAN_ALLOWLIST": "192.168.1.0/24",
    }

    def resolve(value: str) -> str:
        m = re.fullmatch(r"\$\{(\w+)(?::[-?]([^}]*))?\}", value)
        if not m:
            return value
        return dotenv.get(m.group(1)) or (m.group(2) or "")

    container_env = {k: resolve(str(v)) for k, v in env.items()}
    config = load_config(ROOT / "deploy" / "config.yaml", env=container_env)
    assert config.immich.api_key == "key-123"
    assert [(u.name, u.password) for u in config.sftp.users] == [("phone", "pw")]
    assert config.notify.webhook == "https://ntfy.sh/topic"
    assert (config.notify.smtp.host, config.notify.smtp.port) == ("smtp.example.org", 587)
    assert config.notify.smtp.to == ("me@example.org",)
    assert [str(n) for n in config.sftp.ban_allowlist] == ["192.168.1.0/24"]
    assert not config.sftp.proxy_protocol


# -- Grafana dashboard --------------------------------------------------------------------------

REQUIRED_ON_DASHBOARD = {
    "sftpgate_received_files_total",
    "sftpgate_received_bytes_total",
    "sftpgate_processed_files_total",
    "sftpgate_queue_files",
    "sftpgate_undone_files",
    "sftpgate_original_bytes_total",
    "sftpgate_stored_bytes_total",
    "sftpgate_retries_total",
    "sftpgate_sftp_auth_failures_total",
    "sftpgate_immich_up",
    "sftpgate_stage_duration_seconds_bucket",
    "sftpgate_sftp_sessions",
}


def dashboard() -> dict:
    return json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())


def queries(doc: dict) -> list[str]:
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [
        v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        for v in doc["templating"]["list"]
        if v["type"] == "query"
    ]
    return exprs


def test_dashboard_is_well_formed():
    doc = dashboard()
    assert doc["uid"] == "sftpgate" and doc["title"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in doc["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}", "the data source is chosen at import"
            expr = t["expr"]
            for open_, close in ("()", "[]", "{}"):
                assert expr.count(open_) == expr.count(close), expr
    names = {v["name"] for v in doc["templating"]["list"]}
    assert {"datasource", "instance"} <= names
    titles = " ".join(p["title"].lower() for p in doc["panels"])
    for topic in ("received", "queue", "saved", "failures", "immich", "stage duration", "sessions"):
        assert topic in titles, topic


async def test_dashboard_queries_only_metrics_a_running_service_exports(gate):
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{gate.metrics_port}/metrics") as resp,
    ):
        text = await resp.text()
    exported = {
        re.split(r"[{ ]", line, maxsplit=1)[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    used = {name for q in queries(dashboard()) for name in re.findall(r"\bsftpgate_\w+", q)}
    assert used - exported == set(), "the dashboard queries names the service does not export"
    assert used >= REQUIRED_ON_DASHBOARD
