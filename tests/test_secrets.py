"""Secrets stay secret, TLS stays verified, and an exposed config file is pointed out.

The app secret, every access token and the database password must not appear in anything a
run produces: its log at DEBUG, its error messages and exceptions, ``sync_runs.error``,
``sync_run_items.error``, the reports, the command line's output. The runs here are made to
fail in as many ways as possible, because error paths are where secrets usually leak.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import structlog
from click.testing import CliRunner
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

from etl.cli import cli
from etl.config import load_config
from etl.errors import EtlError
from etl.simulator import SimChat, Simulator, World
from etl.sync import run_sync
from tests.conftest import APP_KEY, APP_SECRET
from tests.faults.checks import load_tables
from tests.faults.conftest import Launcher
from tests.helpers import clean_env, fresh_database, migrated, write_config

REPO = Path(__file__).resolve().parents[1]
# Characters that need URL-encoding, so both spellings are searched for.
DB_PASSWORD = f"Pg/pa:ss@w0rd-{uuid.uuid4().hex[:10]}"
TOKEN = re.compile(r"\b[0-9a-f]{32}\b")  # the simulator's access tokens


def _secret_spellings() -> list[str]:
    return [APP_SECRET, DB_PASSWORD, quote(DB_PASSWORD, safe=""), quote(DB_PASSWORD)]


def _leaks(text_: str, world: World | None = None) -> list[str]:
    found = [s for s in _secret_spellings() if s in text_]
    found += TOKEN.findall(text_)
    if world is not None and world.current_token and world.current_token in text_:
        found.append("the current access token")
    return found


# -- a PostgreSQL role with a password ----------------------------------------------------------


@pytest.fixture
def pg_password_url(tmp_path: Path) -> Iterator[URL]:
    """A migrated PostgreSQL database reached as a role that has a password.

    pg_hba may trust 127.0.0.1, in which case the password is not checked: what matters here
    is that it is in the URL the product is given.
    """
    admin_url = migrated(fresh_database("postgresql", tmp_path))
    role = f"etl_secret_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{DB_PASSWORD}'"))
        for grant in (
            f'GRANT ALL ON ALL TABLES IN SCHEMA public TO "{role}"',
            f'GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO "{role}"',
        ):
            conn.execute(text(grant))
    try:
        yield admin_url.set(username=role, password=DB_PASSWORD)
    finally:
        with admin.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :r"),
                {"r": role},
            )
            conn.execute(text(f'DROP OWNED BY "{role}"'))
            conn.execute(text(f'DROP ROLE "{role}"'))
        admin.dispose()


def _faulty_world() -> World:
    world = World(APP_KEY, APP_SECRET)
    world.add_chat(SimChat("chat-a", "Alpha", "u1", ["u1", "u2", "u3"]))
    world.add_chat(SimChat("chat-b", "Beta", "u2", ["u2", "u4"]))
    world.add_chat(SimChat("chat-c", "Gamma", "u5", ["u5", "u6"]))
    world.add_chat(SimChat("chat-x", "Secret", "u9", ["u9"], readable=False))
    world.add_chat(SimChat("chat-bad", "Bad", "u1", ["u1"], raw_chat_info={"name": 5}))
    return world


def test_nothing_a_faulty_run_produces_contains_a_secret(
    pg_password_url: URL, tmp_path: Path
) -> None:
    world = _faulty_world()
    outputs: list[str] = []
    reports = tmp_path / "reports"
    reports.mkdir()
    launcher = Launcher(tmp_path)
    try:
        with Simulator(world) as sim:
            config = write_config(
                tmp_path,
                pg_password_url,
                sim.base_url,
                ["chat-a", "chat-b", "chat-c", "chat-x", "chat-bad"],
                logging={"level": "DEBUG", "format": "json"},
                dingtalk={"max_attempts": 2},
                sync={"concurrency": 2},
            )
            # The same settings from the environment, as a container would pass them.
            env_config = write_config(
                tmp_path,
                make_url("sqlite:///unused.db"),
                sim.base_url,
                ["chat-a"],
                app_secret="placeholder-in-file",
                name="env-config.toml",
                logging={"level": "DEBUG"},
            )
            env = {
                **clean_env(),
                "DINGTALK_APP_SECRET": APP_SECRET,
                "DINGTALK_ETL_DATABASE_URL": pg_password_url.render_as_string(hide_password=False),
            }
            # (arguments, environment (None: the config file only), faults to inject)
            scenarios: list[tuple[list[str], dict[str, str] | None, dict[str, list[str]]]] = [
                # Partial: a busy gettoken, a reset, a 502, an expired token, a truncated
                # body, an HTML page, -1, a chat not readable, a payload that fails validation.
                (
                    ["sync"],
                    None,
                    {
                        "@gettoken": ["errcode:-1"],
                        "chat-a": ["reset", "http:502"],
                        "chat-b": ["expire_token", "truncate"],
                        "chat-c": ["nonjson", "errcode:-1"],
                    },
                ),
                # Failed as a whole: a token refused even when fresh.
                (["sync"], None, {"chat-c": ["errcode:40001", "errcode:40001"]}),
                (["sync", "--chatid", "chat-a"], env, {"chat-a": ["errcode:-1"]}),
                (["runs", "--json"], None, {}),
                (["runs"], env, {}),
                (["status", "--json"], None, {}),
                (["report", "sync-health", "--format", "json"], None, {}),
                (["report", "changes", "--format", "csv"], None, {}),
                (["report", "members", "--chat", "chat-a", "--format", "html"], None, {}),
                (
                    ["report", "chats", "--format", "html", "--output", str(reports / "c.html")],
                    None,
                    {},
                ),
            ]
            codes = []
            for argv, run_env, faults in scenarios:
                for key, specs in faults.items():
                    world.inject(key, *specs)
                which = env_config if run_env is not None else config
                pid = launcher.start(["--config", str(which), *argv], run_env)
                codes.append(launcher.wait(pid))
                outputs.extend(launcher.output(pid))
                world.clear_faults()
    finally:
        launcher.close()

    assert codes[:3] == [1, 3, 0], outputs
    assert set(codes[3:]) <= {0}, outputs
    logged = "\n".join(outputs)
    # It really was a faulty run, logged at DEBUG.
    for event in ("api.token_issued", "api.backoff", "api.token_refresh", "chat.failed"):
        assert f'"event": "{event}"' in logged
    tables = json.dumps(load_tables(pg_password_url), default=str, ensure_ascii=False)
    assert "gave up after 2 attempts" in tables
    report_files = "".join(p.read_text(encoding="utf-8") for p in reports.iterdir())
    assert _leaks(logged, world) == []
    assert _leaks(tables, world) == []
    assert _leaks(report_files, world) == []


# -- errors that carry the database URL ---------------------------------------------------------


@pytest.mark.parametrize(
    "scheme", ["postgresql", "mysql", "mariadb+pymysql"], ids=["postgresql", "mysql", "mariadb"]
)
@pytest.mark.parametrize(
    "command",
    [["sync"], ["db", "upgrade"], ["runs"], ["status"], ["report", "sync-health"]],
    ids=["sync", "db-upgrade", "runs", "status", "report"],
)
def test_unreachable_database_error_hides_the_password(
    tmp_path: Path, scheme: str, command: list[str]
) -> None:
    # Port 1 on loopback: nothing listens, the driver fails with its own message.
    url = make_url(f"{scheme}://etl:{quote(DB_PASSWORD, safe='')}@127.0.0.1:1/etl")
    config = write_config(
        tmp_path, url, "http://127.0.0.1:9", ["chat-a"], logging={"level": "DEBUG"}
    )
    result = CliRunner().invoke(cli, ["--config", str(config), *command], env=_cli_env())

    assert result.exit_code == 3, result.output
    assert "database" in result.stderr
    assert _leaks(result.output + result.stderr) == []


def test_exceptions_and_their_causes_hide_the_password(tmp_path: Path) -> None:
    url = make_url(f"postgresql://etl:{quote(DB_PASSWORD, safe='')}@127.0.0.1:1/etl")
    config_path = write_config(
        tmp_path, url, "http://127.0.0.1:9", ["c"], app_key="k", app_secret="s1234"
    )
    with pytest.raises(EtlError) as caught:
        run_sync(load_config(config_path, environ={}))
    chain: list[BaseException] = []
    error: BaseException | None = caught.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert len(chain) >= 2  # the driver's error is kept as the cause
    assert _leaks("\n".join(f"{e!s}\n{e!r}" for e in chain)) == []


ENCODED = quote(DB_PASSWORD, safe="")


@pytest.mark.parametrize(
    "database",
    [
        f'url = ["postgresql://etl:{ENCODED}@db/etl"]',
        f'url = "postgresql://etl:{ENCODED}@db:port/etl"',
        f'url = "postgresql://etl:{ENCODED}@db/etl"\nbusy_timeout_seconds = "x"',
        f'url = "oracle://etl:{ENCODED}@db/etl"',
        f'url = "postgresql://etl:{DB_PASSWORD}@db/etl"',  # '@' not encoded: resolves nothing
    ],
    ids=["wrong-type", "bad-port", "other-key-wrong", "unsupported-database", "not-encoded"],
)
def test_configuration_errors_hide_the_password(tmp_path: Path, database: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f"[database]\n{database}\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["--config", str(path), "runs"], env=_cli_env())

    assert result.exit_code == 78
    assert "[database]" in result.stderr
    assert _leaks(result.output + result.stderr) == []


def _cli_env() -> dict[str, str | None]:
    return {
        "DINGTALK_APP_KEY": None,
        "DINGTALK_APP_SECRET": None,
        "DINGTALK_ETL_CONFIG": None,
        "DINGTALK_ETL_DATABASE_URL": None,
    }


# -- TLS ----------------------------------------------------------------------------------------


@pytest.fixture
def self_signed_https(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """An HTTPS server on 127.0.0.1 with a certificate nobody vouches for."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    try:
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
                *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
                *("-keyout", str(key), "-out", str(cert)),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
    except FileNotFoundError:
        pytest.skip("openssl is not installed")
    served: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served.append(self.path)
            body = json.dumps({"errcode": 0, "access_token": "a" * 32, "expires_in": 7200})
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_tls_certificates_are_verified(
    self_signed_https: tuple[str, list[str]], sqlite_url: URL, tmp_path: Path
) -> None:
    base_url, served = self_signed_https
    path = write_config(tmp_path, sqlite_url, base_url, ["chat-a"], dingtalk={"max_attempts": 1})
    result = run_sync(load_config(path, environ={}))

    assert (result.status, result.exit_code) == ("failed", 3)
    assert result.error is not None
    assert "CERTIFICATE_VERIFY_FAILED" in result.error
    assert served == []  # the secret never left: the handshake failed before any request


def test_no_code_turns_tls_verification_off() -> None:
    sources = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "etl").glob("*.py"))
    assert re.search(r"verify\s*=\s*False", sources) is None
    assert "CERT_NONE" not in sources
    assert "check_hostname = False" not in sources


# -- the configuration file's permissions -------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "secret_in_file", "warned"),
    [
        (0o600, True, False),
        (0o400, True, False),
        (0o640, True, True),
        (0o604, True, True),
        (0o644, True, True),
        (0o644, False, False),
    ],
    ids=["owner-only", "read-only", "group", "others", "world", "secret-from-environment"],
)
def test_config_readable_by_others_is_warned_about(
    tmp_path: Path, mode: int, secret_in_file: bool, warned: bool
) -> None:
    path = tmp_path / "config.toml"
    secret = f'app_secret = "{APP_SECRET}"\n' if secret_in_file else ""
    path.write_text(f'[dingtalk]\napp_key = "k"\n{secret}[sync]\nchatids = ["c"]\n')
    path.chmod(mode)
    with structlog.testing.capture_logs() as logs:
        load_config(path, environ={"DINGTALK_APP_SECRET": APP_SECRET})

    found = [e for e in logs if e["event"] == "config.insecure_permissions"]
    if not warned:
        assert found == []
        return
    assert found == [
        {
            "event": "config.insecure_permissions",
            "log_level": "warning",
            "path": str(path),
            "mode": f"{mode:04o}",
            "hint": f"the file holds app_secret and other users can read it: chmod 600 {path}",
        }
    ]
    assert APP_SECRET not in json.dumps(found)


def test_cli_warns_on_stderr_about_an_exposed_config(tmp_path: Path, sqlite_url: URL) -> None:
    path = write_config(
        tmp_path, sqlite_url, "http://127.0.0.1:9", ["c"], logging={"level": "WARNING"}
    )
    path.chmod(0o644)
    result = CliRunner().invoke(cli, ["--config", str(path), "db", "upgrade"], env=_cli_env())

    assert result.exit_code == 0, result.output
    warning = json.loads(result.stderr.splitlines()[0])
    assert (warning["event"], warning["level"], warning["mode"]) == (
        "config.insecure_permissions",
        "warning",
        "0644",
    )
