"""load_config: one TOML file plus environment overrides, into a frozen, validated Config."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pydantic
import pytest
from pydantic import BaseModel

from etl.config import _FileModel, load_config, resolve_config_path
from etl.errors import ConfigError
from tests.conftest import APP_KEY, APP_SECRET

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config.example.toml"

CREDENTIALS = f'app_key = "{APP_KEY}"\napp_secret = "{APP_SECRET}"\n'
VALID = f"""
[dingtalk]
base_url = "https://oapi.dingtalk.io"
{CREDENTIALS}
timeout_seconds = 2.5
max_requests_per_second = 15
max_attempts = 3
allow_insecure_http = false
max_response_bytes = 65536

[database]
url = "sqlite:///data/etl.db"

[sync]
chatids = ["chat1", "chat2"]
concurrency = 8

[schedule]
interval_minutes = 30

[logging]
level = "WARNING"
format = "console"
"""


def write(folder: Path, text: str, name: str = "config.toml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def config_error(
    path: Path, *, need_api: bool = True, environ: dict[str, str] | None = None
) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, need_api=need_api, environ={} if environ is None else environ)
    return caught.value.message


def minimal(sync: str = 'chatids = ["chat1"]', dingtalk: str = "", database: str = "") -> str:
    return f"[dingtalk]\n{CREDENTIALS}{dingtalk}\n[database]\n{database}\n[sync]\n{sync}\n"


# -- a valid file ------------------------------------------------------------------------------


def test_valid_file_loads_every_key(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)

    config = load_config(path, environ={})

    assert config.path == path
    assert config.dingtalk.base_url == "https://oapi.dingtalk.io"
    assert (config.app_key, config.app_secret) == (APP_KEY, APP_SECRET)
    assert config.dingtalk.timeout_seconds == 2.5
    assert config.dingtalk.max_requests_per_second == 15
    assert config.dingtalk.max_attempts == 3
    assert config.dingtalk.allow_insecure_http is False
    assert config.dingtalk.max_response_bytes == 65536
    assert config.database_url.render_as_string() == f"sqlite:///{tmp_path / 'data' / 'etl.db'}"
    assert config.chatids == ("chat1", "chat2")
    assert config.sync.concurrency == 8
    assert (config.schedule.cron, config.schedule.interval_minutes) == (None, 30)
    assert (config.logging.level, config.logging.format) == ("WARNING", "console")


def test_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, minimal()), environ={})

    assert config.dingtalk.base_url == "https://oapi.dingtalk.com"
    assert config.dingtalk.timeout_seconds == 10
    assert config.dingtalk.max_requests_per_second == 20
    assert config.dingtalk.max_attempts == 5
    assert config.dingtalk.allow_insecure_http is False
    assert config.dingtalk.max_response_bytes == 8 * 1024 * 1024
    assert config.database_url.render_as_string() == f"sqlite:///{tmp_path / 'dingtalk_etl.db'}"
    assert config.sync.concurrency == 4
    assert config.sync.chatids_file is None
    assert (config.schedule.cron, config.schedule.interval_minutes) == (None, None)
    assert (config.logging.level, config.logging.format) == ("INFO", "json")


@pytest.mark.parametrize(
    ("target", "attribute", "value", "error"),
    [
        ("config", "chatids", ("other",), dataclasses.FrozenInstanceError),
        ("config", "database_url", None, dataclasses.FrozenInstanceError),
        ("dingtalk", "app_key", "other", pydantic.ValidationError),
        ("dingtalk", "base_url", "https://evil.example", pydantic.ValidationError),
        ("sync", "concurrency", 1, pydantic.ValidationError),
        ("logging", "level", "DEBUG", pydantic.ValidationError),
    ],
    ids=["chatids", "database_url", "app_key", "base_url", "concurrency", "logging-level"],
)
def test_loaded_config_is_frozen(
    tmp_path: Path, target: str, attribute: str, value: object, error: type[Exception]
) -> None:
    config = load_config(write(tmp_path, VALID), environ={})
    obj = config if target == "config" else getattr(config, target)
    with pytest.raises(error):
        setattr(obj, attribute, value)


def test_chatid_lists_are_immutable(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, VALID), environ={})
    assert isinstance(config.chatids, tuple)
    assert isinstance(config.sync.chatids, tuple)


# -- environment overrides ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "read"),
    [
        ("DINGTALK_APP_KEY", "env-key", lambda c: c.app_key),
        ("DINGTALK_APP_SECRET", "env-secret-0123456789", lambda c: c.app_secret),
        (
            "DINGTALK_ETL_DATABASE_URL",
            "postgresql+psycopg://etl@db.example.com/etl",
            lambda c: c.database_url.render_as_string(),
        ),
    ],
    ids=["app-key", "app-secret", "database-url"],
)
def test_environment_wins_over_the_file(
    tmp_path: Path, variable: str, value: str, read: Any
) -> None:
    path = write(tmp_path, VALID)
    assert read(load_config(path, environ={})) != value

    assert read(load_config(path, environ={variable: value})) == value


def test_environment_supplies_missing_credentials(tmp_path: Path) -> None:
    path = write(tmp_path, '[sync]\nchatids = ["chat1"]\n')
    environ = {"DINGTALK_APP_KEY": "env-key", "DINGTALK_APP_SECRET": "env-secret-0123456789"}

    config = load_config(path, environ=environ)

    assert (config.app_key, config.app_secret) == ("env-key", "env-secret-0123456789")


def test_empty_environment_variable_does_not_override(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    environ = {"DINGTALK_APP_KEY": "", "DINGTALK_APP_SECRET": "", "DINGTALK_ETL_DATABASE_URL": ""}

    config = load_config(path, environ=environ)

    assert (config.app_key, config.app_secret) == (APP_KEY, APP_SECRET)
    assert config.database_url.database == str(tmp_path / "data" / "etl.db")


def test_bad_database_url_from_the_environment_says_so(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    message = config_error(path, environ={"DINGTALK_ETL_DATABASE_URL": "not a url"})
    assert message == (
        f"{path}: [database] url (from the environment): not a database URL "
        "(e.g. sqlite:///dingtalk_etl.db)"
    )


def test_relative_sqlite_path_from_the_environment_is_left_to_the_working_directory(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, VALID)
    config = load_config(path, environ={"DINGTALK_ETL_DATABASE_URL": "sqlite:///here.db"})
    assert config.database_url.database == "here.db"


# -- errors --------------------------------------------------------------------------------------

PLAIN_HTTP = (
    "[dingtalk] base_url: plain http:// to a non-loopback host would expose the app secret; "
    "use https:// or set allow_insecure_http = true"
)
ERRORS: list[tuple[str, str]] = [
    (minimal(dingtalk="app_kee = 'x'\n"), "[dingtalk] app_kee: unknown key"),
    (minimal() + "[bogus]\nanswer = 42\n", "[bogus]: unknown section"),
    (
        minimal(dingtalk="timeout_seconds = '10'\n"),
        "[dingtalk] timeout_seconds: Input should be a valid number (got '10')",
    ),
    (
        minimal(dingtalk="max_attempts = 2.5\n"),
        "[dingtalk] max_attempts: Input should be a valid integer (got 2.5)",
    ),
    (
        minimal(dingtalk="max_attempts = 0\n"),
        "[dingtalk] max_attempts: Input should be greater than or equal to 1 (got 0)",
    ),
    (
        minimal(dingtalk="allow_insecure_http = 'yes'\n"),
        "[dingtalk] allow_insecure_http: Input should be a valid boolean (got 'yes')",
    ),
    (
        minimal(sync='chatids = ["chat1"]\nconcurrency = true'),
        "[sync] concurrency: Input should be a valid integer (got True)",
    ),
    (
        minimal(sync='chatids = "chat1"'),
        "[sync] chatids: Input should be a valid list (got 'chat1')",
    ),
    (
        minimal(sync='chatids = ["chat1", 2]'),
        "[sync] chatids[1]: Input should be a valid string (got 2)",
    ),
    (
        minimal(sync="chatids = []"),
        "[sync] chatids: no chatids configured (set chatids or chatids_file)",
    ),
    (minimal(sync=""), "[sync] chatids: no chatids configured (set chatids or chatids_file)"),
    (minimal(sync='chatids = ["chat1", "  "]'), "[sync] chatids[1]: empty chatid"),
    (
        minimal(sync=f'chatids = ["{"c" * 129}"]'),
        "[sync] chatids[0]: chatid longer than 128 characters",
    ),
    (
        minimal(sync='chatids = ["chat\\u0007"]'),
        "[sync] chatids[0]: chatid contains a control character",
    ),
    (
        '[sync]\nchatids = ["chat1"]\n',
        "2 configuration problems:\n"
        "  - [dingtalk] app_key: missing (set it in the file or $DINGTALK_APP_KEY)\n"
        "  - [dingtalk] app_secret: missing (set it in the file or $DINGTALK_APP_SECRET)",
    ),
    (
        f'[dingtalk]\napp_key = "{APP_KEY}"\napp_secret = ""\n[sync]\nchatids = ["c"]\n',
        "[dingtalk] app_secret: missing (set it in the file or $DINGTALK_APP_SECRET)",
    ),
    (
        minimal(database="url = 'oracle://scott@db/orcl'"),
        "[database] url: unsupported database 'oracle' (sqlite, postgresql, mysql, mariadb)",
    ),
    (
        minimal(database="url = 'postgresql://db:port/etl'"),
        "[database] url: not a database URL (e.g. sqlite:///dingtalk_etl.db)",
    ),
    (
        minimal(database="url = 'dingtalk_etl.db'"),
        "[database] url: not a database URL (e.g. sqlite:///dingtalk_etl.db)",
    ),
    (
        minimal(dingtalk="base_url = 'oapi.dingtalk.com'\n"),
        "[dingtalk] base_url: must be an http(s) URL such as https://oapi.dingtalk.com "
        "(got 'oapi.dingtalk.com')",
    ),
    (minimal(dingtalk="base_url = 'http://oapi.dingtalk.com'\n"), PLAIN_HTTP),
    (
        minimal() + "[schedule]\ncron = '10 * * * *'\ninterval_minutes = 60\n",
        "[schedule] cron, interval_minutes: give one of them, not both",
    ),
    (
        minimal() + "[schedule]\ninterval_minutes = 0\n",
        "[schedule] interval_minutes: Input should be greater than or equal to 1 (got 0)",
    ),
    (
        minimal() + "[logging]\nlevel = 'info'\n",
        "[logging] level: Input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR' (got 'info')",
    ),
    (
        minimal() + "[logging]\nformat = 'text'\n",
        "[logging] format: Input should be 'json' or 'console' (got 'text')",
    ),
    ("dingtalk = 5\n" + '[sync]\nchatids = ["chat1"]\n', "[dingtalk]: expected a table (got 5)"),
    (
        minimal() + "[events]\ngateway_url = 'http://api.dingtalk.com'\n",
        "[events] gateway_url: plain http:// to a non-loopback host would expose the app secret; "
        "use https:// or set [dingtalk] allow_insecure_http = true",
    ),
    (
        minimal() + "[events]\ngateway_url = 'api.dingtalk.com'\n",
        "[events] gateway_url: must be an http(s) URL such as https://api.dingtalk.com "
        "(got 'api.dingtalk.com')",
    ),
    (
        minimal() + "[events]\nreconcile_delay_seconds = -1\n",
        "[events] reconcile_delay_seconds: Input should be greater than or equal to 0 (got -1)",
    ),
    (
        minimal() + "[events]\nsilence_timeout_seconds = 0\n",
        "[events] silence_timeout_seconds: Input should be greater than 0 (got 0)",
    ),
    (
        minimal() + "[events]\ndiscover_chats = 'yes'\n",
        "[events] discover_chats: Input should be a valid boolean (got 'yes')",
    ),
]


@pytest.mark.parametrize(
    ("text", "problem"),
    ERRORS,
    ids=[
        "unknown-key",
        "unknown-section",
        "string-for-number",
        "float-for-integer",
        "max-attempts-zero",
        "string-for-boolean",
        "boolean-for-integer",
        "string-for-list",
        "integer-in-chatids",
        "empty-chatid-list",
        "no-chatids-key",
        "blank-chatid",
        "chatid-too-long",
        "chatid-control-character",
        "missing-credentials",
        "empty-secret",
        "unsupported-database",
        "port-not-a-number",
        "path-not-a-url",
        "base-url-without-scheme",
        "plain-http-remote",
        "cron-and-interval",
        "interval-zero",
        "lowercase-level",
        "unknown-log-format",
        "section-not-a-table",
        "events-plain-http-remote",
        "events-gateway-without-scheme",
        "events-negative-delay",
        "events-zero-silence",
        "events-string-for-boolean",
    ],
)
def test_configuration_error_names_the_file_and_the_key(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = write(tmp_path, text)
    assert config_error(path) == f"{path}: {problem}"


def test_every_problem_is_reported_in_one_message(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[dingtalk]
app_key = 12345
bogus = true
base_url = "http://dingtalk.example.com"

[database]
url = "sqlite:///etl.db"
colour = "blue"

[sync]
chatids = []
chatids_file = "missing-chatids.txt"
concurrency = 0

[schedule]
cron = "10 * * * *"
interval_minutes = 60

[extras]
""",
    )

    assert config_error(path) == (
        f"{path}: 9 configuration problems:\n"
        "  - [dingtalk] app_key: Input should be a valid string (got 12345)\n"
        "  - [dingtalk] bogus: unknown key\n"
        "  - [database] colour: unknown key\n"
        "  - [sync] concurrency: Input should be greater than or equal to 1 (got 0)\n"
        "  - [extras]: unknown section\n"
        f"  - {PLAIN_HTTP}\n"
        "  - [dingtalk] app_secret: missing (set it in the file or $DINGTALK_APP_SECRET)\n"
        f"  - [sync] chatids_file: cannot read {tmp_path / 'missing-chatids.txt'}: "
        "No such file or directory\n"
        "  - [schedule] cron, interval_minutes: give one of them, not both"
    )


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda folder: None, "No such file or directory"),
        (lambda folder: (folder / "chatids.txt").mkdir(), "Is a directory"),
        (
            lambda folder: (folder / "chatids.txt").write_bytes(b"chat1\n\xff\xfe\n"),
            "'utf-8' codec can't decode byte 0xff in position 6: invalid start byte",
        ),
    ],
    ids=["missing", "directory", "not-utf8"],
)
def test_unreadable_chatids_file(tmp_path: Path, make: Any, reason: str) -> None:
    make(tmp_path)
    path = write(tmp_path, minimal(sync='chatids_file = "chatids.txt"'))
    assert config_error(path) == (
        f"{path}: [sync] chatids_file: cannot read {tmp_path / 'chatids.txt'}: {reason}"
    )


def test_bad_line_in_chatids_file_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "chatids.txt").write_text(f"chat1\n# ok\n{'c' * 200}  # too long\n")
    path = write(tmp_path, minimal(sync='chatids_file = "chatids.txt"'))
    assert config_error(path) == (
        f"{path}: [sync] chatids_file: {tmp_path / 'chatids.txt'} line 3: "
        "chatid longer than 128 characters"
    )


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "config.toml"
    assert config_error(path) == (
        f"{path}: configuration file not found (use --config PATH or set DINGTALK_ETL_CONFIG; "
        "config.example.toml documents every key)"
    )


@pytest.mark.parametrize(
    "text",
    ['[dingtalk\napp_key = "k"\n', '[sync]\nchatids = ["a",\n', "key = 'unterminated\n"],
    ids=["open-table", "open-array", "open-string"],
)
def test_invalid_toml(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(tomllib.TOMLDecodeError) as parse_error:
        tomllib.loads(text)
    assert config_error(path) == f"{path}: invalid TOML: {parse_error.value}"


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b'[sync]\nchatids = ["\xff"]\n')
    assert config_error(path) == (
        f"{path}: cannot read configuration file: 'utf-8' codec can't decode byte 0xff "
        "in position 19: invalid start byte"
    )


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert config_error(tmp_path) == (
        f"{tmp_path}: cannot read configuration file: [Errno 21] Is a directory: '{tmp_path}'"
    )


# -- chatids -------------------------------------------------------------------------------------


def test_chatids_file_with_comments_and_blank_lines_relative_to_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc"
    write(
        folder,
        "# chats of the finance department\n"
        "\n"
        "chatfile1\n"
        "   chatfile2   # the payroll group\n"
        "#chatcommented\n"
        "   \n"
        "chatfile3\r\n",
        name="lists/chatids.txt",
    )
    path = write(folder, minimal(sync='chatids_file = "lists/chatids.txt"'))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_config(path, environ={})

    assert config.chatids == ("chatfile1", "chatfile2", "chatfile3")


def test_absolute_chatids_file(tmp_path: Path) -> None:
    listing = write(tmp_path / "lists", "chatabs\n", name="ids.txt")
    path = write(tmp_path / "etc", minimal(sync=f'chatids_file = "{listing}"'))
    assert load_config(path, environ={}).chatids == ("chatabs",)


def test_duplicates_across_list_and_file_are_synced_once_in_order(tmp_path: Path) -> None:
    write(tmp_path, "chat3\nchat1\nchat4\nchat3\n", name="chatids.txt")
    path = write(
        tmp_path,
        minimal(
            sync='chatids = ["chat2", "chat1", " chat2 ", "chat1"]\nchatids_file = "chatids.txt"'
        ),
    )

    config = load_config(path, environ={})

    assert config.chatids == ("chat2", "chat1", "chat3", "chat4")


def test_chatids_are_case_sensitive(tmp_path: Path) -> None:
    path = write(tmp_path, minimal(sync='chatids = ["chatA", "chata", "CHATA"]'))
    assert load_config(path, environ={}).chatids == ("chatA", "chata", "CHATA")


def test_file_only_chatids_are_enough(tmp_path: Path) -> None:
    write(tmp_path, "chat9\n", name="ids.txt")
    path = write(tmp_path, minimal(sync='chatids_file = "ids.txt"'))
    assert load_config(path, environ={}).chatids == ("chat9",)


def test_chatids_file_with_only_comments_is_an_empty_list(tmp_path: Path) -> None:
    write(tmp_path, "# nothing yet\n\n", name="ids.txt")
    path = write(tmp_path, minimal(sync='chatids_file = "ids.txt"'))
    assert config_error(path) == (
        f"{path}: [sync] chatids: no chatids configured (set chatids or chatids_file)"
    )


# -- the database URL ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://etl@db.example.com/etl", "postgresql+psycopg://etl@db.example.com/etl"),
        ("postgresql+psycopg://etl@db/etl", "postgresql+psycopg://etl@db/etl"),
        (
            "mysql://etl@db.example.com/etl",
            "mysql+pymysql://etl@db.example.com/etl?charset=utf8mb4",
        ),
        ("mariadb://etl@db/etl", "mariadb+pymysql://etl@db/etl?charset=utf8mb4"),
        ("mysql+pymysql://etl@db/etl", "mysql+pymysql://etl@db/etl?charset=utf8mb4"),
        ("mysql://etl@db/etl?charset=utf8", "mysql+pymysql://etl@db/etl?charset=utf8"),
        ("sqlite:////var/lib/etl.db", "sqlite:////var/lib/etl.db"),
        ("sqlite://", "sqlite://"),
    ],
    ids=[
        "postgresql-gets-psycopg",
        "postgresql-driver-kept",
        "mysql-gets-pymysql-utf8mb4",
        "mariadb-gets-pymysql-utf8mb4",
        "mysql-driver-kept-charset-added",
        "explicit-charset-kept",
        "sqlite-absolute",
        "sqlite-memory",
    ],
)
def test_database_url_gets_the_installed_driver(tmp_path: Path, url: str, expected: str) -> None:
    path = write(tmp_path, minimal(database=f'url = "{url}"'))
    config = load_config(path, environ={})
    assert config.database_url.render_as_string(hide_password=False) == expected


def test_relative_sqlite_path_resolves_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc" / "dingtalk-etl"
    write(folder, minimal(database='url = "sqlite:///state/etl.db"'))
    monkeypatch.chdir(tmp_path)

    config = load_config(Path("etc/dingtalk-etl/config.toml"), environ={})

    assert config.database_url.database == str(folder / "state" / "etl.db")


def test_database_password_is_hidden_in_display(tmp_path: Path) -> None:
    path = write(tmp_path, minimal(database='url = "postgresql://etl:hunter2pw@db/etl"'))
    config = load_config(path, environ={})
    assert config.database_display == "postgresql+psycopg://etl:***@db/etl"
    assert "hunter2pw" not in repr(config)


# -- base_url ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_url", "allow", "accepted"),
    [
        ("https://oapi.dingtalk.com", False, True),
        ("http://127.0.0.1:8765", False, True),
        ("http://127.1.2.3:8765", False, True),
        ("http://localhost:8765", False, True),
        ("http://[::1]:8765", False, True),
        ("http://oapi.dingtalk.com", False, False),
        ("http://10.0.0.5:8765", False, False),
        ("http://oapi.dingtalk.com", True, True),
        ("http://localhost.evil.example", False, False),
    ],
    ids=[
        "https",
        "loopback-ip",
        "loopback-range",
        "localhost",
        "ipv6-loopback",
        "plain-http-remote",
        "plain-http-private-ip",
        "plain-http-allowed",
        "localhost-lookalike",
    ],
)
def test_plain_http_only_to_loopback_unless_allowed(
    tmp_path: Path, base_url: str, allow: bool, accepted: bool
) -> None:
    flag = "true" if allow else "false"
    path = write(
        tmp_path, minimal(dingtalk=f'base_url = "{base_url}"\nallow_insecure_http = {flag}\n')
    )
    if accepted:
        assert load_config(path, environ={}).dingtalk.base_url == base_url
    else:
        assert config_error(path) == f"{path}: {PLAIN_HTTP}"


# -- need_api=False (db upgrade, runs) -----------------------------------------------------------


def test_database_only_commands_tolerate_missing_credentials_and_chatids(tmp_path: Path) -> None:
    path = write(tmp_path, '[database]\nurl = "sqlite:///etl.db"\n')

    config = load_config(path, need_api=False, environ={})

    assert config.database_url.database == str(tmp_path / "etl.db")
    assert (config.app_key, config.app_secret, config.chatids) == ("", "", ())


def test_database_only_commands_still_reject_unknown_keys(tmp_path: Path) -> None:
    path = write(tmp_path, '[database]\nurl = "sqlite:///etl.db"\nuser = "etl"\n')
    assert config_error(path, need_api=False) == f"{path}: [database] user: unknown key"


def test_database_only_commands_ignore_an_unreadable_chatids_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[sync]\nchatids_file = "nope.txt"\n')
    assert load_config(path, need_api=False, environ={}).chatids == ()


# -- secrets -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "environ"),
    [
        (
            f'[dingtalk]\napp_secret = "{APP_SECRET}"\nbogus = "{APP_SECRET}x"\n'
            "[sync]\nchatids = []\n",
            {},
        ),
        (
            '[dingtalk]\nmax_attempts = "many"\n[sync]\nchatids = []\n',
            {"DINGTALK_APP_SECRET": APP_SECRET},
        ),
        (
            f'[dingtalk]\napp_key = "k"\napp_secret = ["{APP_SECRET}"]\n[sync]\nchatids = ["c"]\n',
            {},
        ),
        (f'[dingtalk]\napp_key = "{APP_SECRET}"\napp_secret = "{APP_SECRET}"\n', {}),
        (f'[dingtalk]\napp_key = ["{APP_SECRET}"]\napp_secret = "{APP_SECRET}"\n', {}),
    ],
    ids=["in-file", "in-environment", "wrong-type", "pasted-as-key", "inside-another-value"],
)
def test_app_secret_never_appears_in_the_error(
    tmp_path: Path, text: str, environ: dict[str, str]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=environ)
    assert str(caught.value).startswith(f"{path}: ")
    for shown in (str(caught.value), repr(caught.value), caught.value.message):
        assert APP_SECRET not in shown


def test_app_secret_never_appears_in_repr_of_the_config(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, VALID), environ={})
    assert config.app_secret == APP_SECRET
    for shown in (repr(config), str(config), repr(config.dingtalk), str(config.dingtalk)):
        assert APP_SECRET not in shown
    assert "SecretStr('**********')" in repr(config)


# -- where the file is -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "environ", "expected"),
    [
        ("given.toml", {"DINGTALK_ETL_CONFIG": "/etc/env.toml"}, "given.toml"),
        (None, {"DINGTALK_ETL_CONFIG": "/etc/env.toml"}, "/etc/env.toml"),
        (None, {"DINGTALK_ETL_CONFIG": ""}, "config.toml"),
        (None, {}, "config.toml"),
    ],
    ids=["option-wins", "environment", "empty-environment", "default"],
)
def test_resolve_config_path(option: str | None, environ: dict[str, str], expected: str) -> None:
    assert resolve_config_path(option, environ) == Path(expected)


# -- config.example.toml ---------------------------------------------------------------------


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE, environ={})

    assert config.chatids
    assert config.dingtalk.base_url == "https://oapi.dingtalk.com"
    assert config.database_url.database == str(REPO / "dingtalk_etl.db")


def _documented_keys(text: str) -> dict[str, set[str]]:
    """Section -> keys set or shown commented out (``# key = ...``) in the example."""
    keys: dict[str, set[str]] = {}
    section = ""
    for line in text.splitlines():
        header = re.fullmatch(r"\[(\w+)\]\s*", line)
        if header:
            section = header.group(1)
            keys.setdefault(section, set())
            continue
        key = re.match(r"#?\s?(\w+) = ", line)
        if key and section:
            keys[section].add(key.group(1))
    return keys


def _accepted_keys() -> dict[str, set[str]]:
    accepted: dict[str, set[str]] = {}
    for section, field in _FileModel.model_fields.items():
        model = field.annotation
        assert isinstance(model, type)
        assert issubclass(model, BaseModel)
        accepted[section] = set(model.model_fields)
    return accepted


def test_example_config_documents_every_accepted_key() -> None:
    documented = _documented_keys(EXAMPLE.read_text(encoding="utf-8"))
    assert documented == _accepted_keys()


def test_example_config_explains_each_key() -> None:
    """Every documented key is preceded by a comment that gives its default."""
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    for index, line in enumerate(lines):
        if re.match(r"(\w+) = ", line):
            comment: list[str] = []
            for previous in reversed(lines[:index]):
                if not previous.startswith("#"):
                    break
                comment.append(previous)
            assert comment, f"{line!r} has no comment above it"
            assert "default" in " ".join(comment).lower(), f"{line!r}: no default given"


@pytest.mark.parametrize(
    ("key", "variable"),
    [
        ("app_key", "DINGTALK_APP_KEY"),
        ("app_secret", "DINGTALK_APP_SECRET"),
        ("url", "DINGTALK_ETL_DATABASE_URL"),
    ],
    ids=["app-key", "app-secret", "database-url"],
)
def test_example_config_names_the_environment_overrides(key: str, variable: str) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    block = text[: text.index(f"\n{key} = ")]
    assert variable in block[block.rindex("\n\n") :]
