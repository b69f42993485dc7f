"""Configuration: the minimal file runs, every mistake stops start-up with one line that
names the key, and config.yaml.example documents every key there is."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from sftpgate.config import Config, ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
SPEC_MINIMAL = """\
data_dir: ./data
immich:
  url: http://immich-server:2283
  api_key: ${IMMICH_API_KEY}
sftp:
  listen: 0.0.0.0:2222
  host_keys_dir: ./keys
  users:
    - name: phone
      password: ${SFTP_PASSWORD}          # or password_hash: (from `sftpgate hash-password`)
      authorized_keys: [ "ssh-ed25519 AAAA... phone" ]   # or a path to an authorized_keys file
      # immich_api_key: ${IMMICH_API_KEY_BOB}   per-user Immich account (default: immich.api_key)
metrics:
  listen: 0.0.0.0:9090                   # /metrics /healthz /readyz
"""
ENV = {"IMMICH_API_KEY": "k3y", "SFTP_PASSWORD": "pa#ss: word"}


def check_config(
    tmp_path: Path, text: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "sftpgate.main", "--config", str(path), "check-config"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=tmp_path,
    )


def test_the_minimal_file_from_the_spec_is_valid_and_interpolated(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(SPEC_MINIMAL)
    cfg = load_config(path, env=ENV)
    assert cfg.immich.api_key == "k3y"
    assert cfg.sftp.users[0].password == "pa#ss: word"  # YAML-special characters survive
    assert cfg.data_path == tmp_path / "data"  # relative to the file's folder
    assert cfg.retry.give_up_after == 7 * 86400
    result = check_config(tmp_path, SPEC_MINIMAL, ENV)
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def test_default_value_syntax(tmp_path):
    text = SPEC_MINIMAL.replace("${SFTP_PASSWORD}", "${SFTP_PASSWORD:-fallback}")
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert load_config(path, env={"IMMICH_API_KEY": "k"}).sftp.users[0].password == "fallback"
    assert (
        load_config(path, env={"IMMICH_API_KEY": "k", "SFTP_PASSWORD": "set"})
        .sftp.users[0]
        .password
        == "set"
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda t: t + "unknwon_key: 1\n", "unknwon_key: unknown key"),
        (
            lambda t: t.replace("listen: 0.0.0.0:2222", "listen: 0.0.0.0:2222\n  remember_dayz: 3"),
            "sftp.remember_dayz: unknown key",
        ),
        (lambda t: t + "optimize:\n  workers: many\n", "optimize.workers: expected a whole number"),
        (
            lambda t: t + "optimize:\n  min_savings: true\n",
            "optimize.min_savings: expected a number",
        ),
        (
            lambda t: t + "retry:\n  give_up_after: soon\n",
            "retry.give_up_after: expected a number or a duration",
        ),
        (
            lambda t: t + "optimize:\n  jpeg:\n    mode: pretty\n",
            "optimize.jpeg.mode: must be one of lossless, lossy, keep",
        ),
        (
            lambda t: t.replace("  url: http://immich-server:2283\n", ""),
            "immich.url: required but missing",
        ),
        (lambda t: t.replace("http://immich-server:2283", ""), "immich.url: has no value"),
        (
            lambda t: t.replace("http://immich-server", "ftp://immich"),
            "immich.url: must start with http",
        ),
        (
            lambda t: t.replace("name: phone", "name: undone"),
            "sftp.users[0].name: 'undone' is reserved",
        ),
        (
            lambda t: t.replace("listen: 0.0.0.0:2222", "listen: 0.0.0.0:2222\n  ciphers: [rot13]"),
            "sftp.ciphers[0]: unknown cipher 'rot13'",
        ),
        (
            lambda t: t.replace("listen: 0.0.0.0:2222", "listen: 0.0.0.0:2222\n  processes: -1"),
            "sftp.processes: must not be negative",
        ),
        (lambda t: t + "timezone: Mars/Olympus\n", "timezone: unknown time zone"),
        (lambda t: t.replace("0.0.0.0:9090", "nine"), "metrics.listen: expected HOST:PORT"),
    ],
)
def test_a_mistake_stops_with_one_line_naming_the_key(tmp_path, change, expected):
    result = check_config(tmp_path, change(SPEC_MINIMAL), ENV)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert expected in lines[0]


def test_a_missing_environment_variable_names_key_and_variable(tmp_path):
    result = check_config(tmp_path, SPEC_MINIMAL, {"IMMICH_API_KEY": "k"})
    assert result.returncode == 2
    assert "sftp.users[0].password: environment variable SFTP_PASSWORD is not set" in result.stderr


def test_serve_refuses_to_start_on_a_bad_config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(SPEC_MINIMAL + "surprise: yes\n")
    result = subprocess.run(
        [sys.executable, "-m", "sftpgate.main", "--config", str(path), "serve"],
        capture_output=True, text=True, env={**os.environ, **ENV}, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == "config error: surprise: unknown key"


def _keys(cls: type, prefix: str = "") -> set[str]:
    out: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            out |= _keys(tp, key + ".")
        elif args and dataclasses.is_dataclass(args[0]):
            out |= _keys(args[0], key + "[].")
        else:
            out.add(key)
    return out


def _present(doc: object, prefix: str = "") -> set[str]:
    out: set[str] = set()
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.add(f"{prefix}{k}")
            out |= _present(v, f"{prefix}{k}.")
    elif isinstance(doc, list) and doc and isinstance(doc[0], dict):
        out |= _present(doc[0], prefix[:-1] + "[].")
    return out


def test_the_example_documents_every_key_with_its_default():
    text = (ROOT / "config.yaml.example").read_text()
    doc = yaml.safe_load(text)
    missing = _keys(Config) - _present(doc)
    assert not missing, f"config.yaml.example lacks: {sorted(missing)}"
    cfg = config_from_dict(doc, base_dir=ROOT, env={"IMMICH_API_KEY": "k", "SFTP_PASSWORD": "p"})
    defaults = config_from_dict(
        {
            "immich": {"url": cfg.immich.url, "api_key": "k"},
            "sftp": {"users": [{"name": "phone", "password": "p"}]},
        },
        base_dir=ROOT,
    )
    # Every value the example shows is the default (apart from what a user must fill in).
    for section in ("optimize", "retry", "watch", "metrics", "log"):
        assert getattr(cfg, section) == getattr(defaults, section), section
    assert dataclasses.replace(cfg.sftp, users=()) == dataclasses.replace(defaults.sftp, users=())


def test_errors_are_collected_not_just_the_first():
    with pytest.raises(ConfigError) as err:
        config_from_dict(
            {"immich": {"url": "ftp://x"}, "bogus": 1, "sftp": {"users": []}}, base_dir=ROOT, env={}
        )
    assert any(p.startswith("bogus:") for p in err.value.problems)


def test_environment_only_configuration_when_there_is_no_file(tmp_path):
    env = {
        "SFTPGATE_IMMICH_URL": "http://immich-server:2283",
        "SFTPGATE_IMMICH_API_KEY": "k3y",
        "SFTPGATE_SFTP_USER": "anna",
        "SFTPGATE_SFTP_PASSWORD": "s3cret",
        "SFTPGATE_SFTP_PORT": "2022",
    }
    result = subprocess.run(
        [sys.executable, "-m", "sftpgate.main", "check-config"],
        capture_output=True, text=True, env={**os.environ, **env}, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    cfg = load_config(tmp_path / "absent.yaml", env=env)
    assert (cfg.immich.url, cfg.immich.api_key) == ("http://immich-server:2283", "k3y")
    assert (cfg.sftp.users[0].name, cfg.sftp.users[0].password, cfg.sftp.listen) == (
        "anna",
        "s3cret",
        "0.0.0.0:2022",
    )
    missing = subprocess.run(
        [sys.executable, "-m", "sftpgate.main", "check-config"],
        capture_output=True, text=True, env={**os.environ, "SFTPGATE_IMMICH_URL": "http://x"}, cwd=tmp_path,
    )  # fmt: skip
    assert missing.returncode == 2
    assert (
        "immich.api_key: environment variable SFTPGATE_IMMICH_API_KEY is not set" in missing.stderr
    )


def test_config_is_the_bottom_layer_and_imports_nothing_of_the_sftp_server(tmp_path):
    """Loading a configuration, users.conf included, must not pull in the SFTP layer."""
    (tmp_path / "users.conf").write_text("phone:secret:::upload\n")
    (tmp_path / "config.yaml").write_text(
        "immich: {url: 'http://immich:2283', api_key: k}\nsftp: {users_conf: users.conf}\n"
    )
    probe = (
        "import sys; from sftpgate.config import load_config;"
        f" load_config({str(tmp_path / 'config.yaml')!r});"
        " print(sorted(m for m in sys.modules if m.startswith('sftpgate.sftp')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ["sftpgate.accounts", "sftpgate.users_conf"])
def test_the_account_rules_and_users_conf_sit_below_config(module):
    """config.py uses them, so they must not use it: the dependency goes one way."""
    probe = f"import sys, {module}; print(*(m for m in sys.modules if m.startswith('sftpgate.')))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert set(out.stdout.split()) <= {module, "sftpgate.accounts"}
