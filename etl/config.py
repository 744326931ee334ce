"""Configuration: one TOML file plus environment overrides, loaded once into a frozen object.

Bottom layer: imports only ``etl.errors``, ``etl.redact`` and ``etl.normalize`` (and
``etl.crontab``, with APScheduler, only to check a ``[schedule] cron``). Every problem
found (unknown keys, wrong types, missing credentials, no chatids, unreadable chatids_file) is
collected into a single ``ConfigError`` that names the file and each bad key, so an operator
fixes them in one go.
"""

from __future__ import annotations

import os
import stat
import tomllib
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import structlog
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
)
from pydantic_core import PydanticCustomError
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from etl.errors import ConfigError
from etl.normalize import MAX_ID_LENGTH
from etl.redact import register_secret

DEFAULT_CONFIG_PATH = "config.toml"
ENV_CONFIG = "DINGTALK_ETL_CONFIG"
ENV_APP_KEY = "DINGTALK_APP_KEY"
ENV_APP_SECRET = "DINGTALK_APP_SECRET"  # noqa: S105 - the variable's name, not a secret
ENV_DATABASE_URL = "DINGTALK_ETL_DATABASE_URL"

log = structlog.get_logger("etl.config")

# The drivers this package installs; a URL without a driver gets these rather than
# SQLAlchemy's defaults (psycopg2, mysqlclient), which are not installed.
_DEFAULT_DRIVERS = {"postgresql": "psycopg", "mysql": "pymysql", "mariadb": "pymysql"}
_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}

PositiveFloat = Annotated[float, Field(gt=0)]
# The [schedule] keys that say when `dingtalk-etl schedule` runs; exactly one is needed.
SCHEDULE_TRIGGERS = ("cron", "interval_minutes", "interval_seconds")


def _list_to_tuple(value: object) -> object:
    if isinstance(value, list | tuple):
        return tuple(value)
    raise PydanticCustomError("list_type", "Input should be a valid list")


# TOML gives a list; the settings keep a tuple so that the loaded configuration is immutable.
StrTuple = Annotated[tuple[str, ...], BeforeValidator(_list_to_tuple)]


def _check_timezone(value: str) -> str:
    try:
        zoneinfo.ZoneInfo(value)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        raise PydanticCustomError(
            "timezone", "unknown time zone (use an IANA name such as 'Asia/Shanghai' or 'UTC')"
        ) from None
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DingTalkSettings(_Section):
    base_url: str = "https://oapi.dingtalk.com"
    app_key: str | None = None
    app_secret: SecretStr | None = None
    timeout_seconds: PositiveFloat = 10.0
    max_requests_per_second: PositiveFloat = 20.0
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 5
    # Plain http:// to a non-loopback host would send the app secret in clear text.
    allow_insecure_http: bool = False
    # A chat/get answer above this size is refused (10,000 members is about 300 KB).
    max_response_bytes: Annotated[int, Field(ge=1024)] = 8 * 1024 * 1024
    # API calls the organisation may make in a month (standard edition: 5,000); None: unknown.
    monthly_call_quota: Annotated[int, Field(ge=1)] | None = None
    # Where the quota month begins (DingTalk counts in China's time).
    quota_timezone: Annotated[str, AfterValidator(_check_timezone)] = "Asia/Shanghai"


class DatabaseSettings(_Section):
    url: str = "sqlite:///dingtalk_etl.db"
    # SQLite only: how long a write waits for another writer before the run fails.
    busy_timeout_seconds: PositiveFloat = 30.0


class SyncSettings(_Section):
    chatids: StrTuple = ()
    chatids_file: str | None = None
    concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    # Past this, the run takes no new chat, writes the ones in hand and ends partial/failed.
    run_budget_seconds: PositiveFloat | None = None
    # Which chats a run without chat arguments reads: every one not dismissed, or those due.
    polling: Literal["every_run", "adaptive"] = "every_run"
    # adaptive: a changed chat is due again after this long; an unchanged chat's interval
    # doubles up to max_poll_interval_seconds.
    poll_interval_seconds: Annotated[int, Field(ge=1)] = 3600
    max_poll_interval_seconds: Annotated[int, Field(ge=1)] = 86400


def _check_cron(value: str) -> str:
    from etl.crontab import check_crontab  # APScheduler: only for a file with a cron

    try:
        check_crontab(value)
    except ValueError as exc:
        raise PydanticCustomError(
            "cron", "not a crontab expression: {reason}", {"reason": str(exc)}
        ) from None
    return value


def _check_http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise PydanticCustomError(
            "url", "must be an http(s) URL such as https://hc-ping.com/<uuid>"
        )
    return value


class ScheduleSettings(_Section):
    cron: Annotated[str, AfterValidator(_check_cron)] | None = None
    interval_minutes: Annotated[int, Field(ge=1)] | None = None
    # Advanced: sub-minute intervals (tests, very small setups); prefer interval_minutes.
    interval_seconds: Annotated[int, Field(ge=1)] | None = None
    run_on_start: bool = False
    timezone: Annotated[str, AfterValidator(_check_timezone)] = "UTC"
    jitter_seconds: Annotated[int, Field(ge=0)] = 0
    misfire_grace_time: Annotated[int, Field(ge=1)] = 300


class MonitoringSettings(_Section):
    # Relative to the config file's folder; ``Config.metrics_path`` is the resolved path.
    metrics_file: str | None = None
    healthcheck_url: Annotated[str, AfterValidator(_check_http_url)] | None = None


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "console"] = "json"


class ReportSettings(_Section):
    # Zone in which `dingtalk-etl report` shows times and reads naive --as-of/--since/--until.
    timezone: Annotated[str, AfterValidator(_check_timezone)] = "UTC"


class EventsSettings(_Section):
    # `schedule` also listens; `listen` always does.
    enabled: bool = False
    # POST {gateway_url}/v1.0/gateway/connections/open opens a Stream-mode connection.
    gateway_url: str = "https://api.dingtalk.com"
    # A chat with events is re-read this long after its last event: a burst costs one call.
    reconcile_delay_seconds: Annotated[float, Field(ge=0)] = 30.0
    # An event for a chat outside the synced set adds it (discovered_chats).
    discover_chats: bool = False
    # No frame at all (pings included) for this long: the connection is dead, reconnect.
    silence_timeout_seconds: PositiveFloat = 90.0


class _FileModel(_Section):
    dingtalk: DingTalkSettings = Field(default_factory=DingTalkSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    sync: SyncSettings = Field(default_factory=SyncSettings)
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings)
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    report: ReportSettings = Field(default_factory=ReportSettings)
    events: EventsSettings = Field(default_factory=EventsSettings)


@dataclass(frozen=True)
class Config:
    """The validated configuration; ``chatids`` merges the list and the file, deduplicated."""

    path: Path
    dingtalk: DingTalkSettings
    database_url: URL
    sync: SyncSettings
    schedule: ScheduleSettings
    logging: LoggingSettings
    chatids: tuple[str, ...]
    monitoring: MonitoringSettings = field(default_factory=MonitoringSettings)
    metrics_path: Path | None = None  # [monitoring] metrics_file, resolved
    report: ReportSettings = field(default_factory=ReportSettings)
    events: EventsSettings = field(default_factory=EventsSettings)
    # Not the whole [database] section: its url holds the password, and this repr must not.
    busy_timeout_seconds: float = 30.0  # [database] busy_timeout_seconds

    @property
    def app_key(self) -> str:
        return self.dingtalk.app_key or ""

    @property
    def app_secret(self) -> str:
        secret = self.dingtalk.app_secret
        return secret.get_secret_value() if secret is not None else ""

    @property
    def database_display(self) -> str:
        """The database URL with its password hidden, for messages."""
        return self.database_url.render_as_string(hide_password=True)


def resolve_config_path(option: str | None, environ: Mapping[str, str] | None = None) -> Path:
    """``--config`` wins, then ``$DINGTALK_ETL_CONFIG``, then ``./config.toml``."""
    env = os.environ if environ is None else environ
    return Path(option or env.get(ENV_CONFIG) or DEFAULT_CONFIG_PATH)


def load_config(
    path: Path | str,
    *,
    need_api: bool = True,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read, override from the environment, validate and resolve the configuration.

    ``need_api=False`` is for commands that only touch the database (``db upgrade``, ``runs``):
    missing DingTalk credentials and chatids are then no error.
    """
    env = os.environ if environ is None else environ
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: configuration file not found (use --config PATH or set {ENV_CONFIG}; "
            "config.example.toml documents every key)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read configuration file: {exc}") from exc
    try:
        raw: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    _warn_if_secret_exposed(path, raw)
    return parse_config(raw, path, need_api=need_api, environ=env)


def _warn_if_secret_exposed(path: Path, raw: Mapping[str, Any]) -> None:
    """A warning, not an error: the file may be shared on purpose, but the secret leaks."""
    dingtalk = raw.get("dingtalk")
    if not isinstance(dingtalk, dict) or not dingtalk.get("app_secret"):
        return
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if mode & 0o044:
        log.warning(
            "config.insecure_permissions",
            path=str(path),
            mode=f"{mode:04o}",
            hint=f"the file holds app_secret and other users can read it: chmod 600 {path}",
        )


def parse_config(
    raw: dict[str, Any],
    path: Path,
    *,
    need_api: bool = True,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Validate an already-parsed TOML document as if it came from ``path``."""
    env = os.environ if environ is None else environ
    raw = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}
    overrides = _env_overrides(env)
    for (section, key), value in overrides.items():
        target = raw.setdefault(section, {})
        if isinstance(target, dict):
            target[key] = value

    # Registered before anything can fail, so that no message can carry it.
    dingtalk = raw.get("dingtalk")
    secret = dingtalk.get("app_secret") if isinstance(dingtalk, dict) else None
    register_secret(secret if isinstance(secret, str) else None)

    problems: list[str] = []
    model, bad = _validate(raw, overrides, path, problems)

    def ok(section: str, *keys: str) -> bool:
        return (section,) not in bad and not any((section, key) in bad for key in keys)

    base = path.resolve().parent
    db_url: URL | None = None
    if ok("database", "url"):
        db_url = _database_url(
            model.database.url, base, from_env=("database", "url") in overrides, problems=problems
        )
    insecure = model.dingtalk.allow_insecure_http
    if ok("dingtalk", "base_url", "allow_insecure_http"):
        _check_base_url(
            "[dingtalk] base_url",
            model.dingtalk.base_url,
            "https://oapi.dingtalk.com",
            insecure,
            problems,
        )
    if ok("events", "gateway_url") and ok("dingtalk", "allow_insecure_http"):
        _check_base_url(
            "[events] gateway_url",
            model.events.gateway_url,
            "https://api.dingtalk.com",
            insecure,
            problems,
        )
    chatids: tuple[str, ...] = ()
    if need_api:
        _check_credentials(model.dingtalk, ok, problems)
        chatids = _collect_chatids(
            model.sync, base, problems, report_empty=ok("sync", "chatids", "chatids_file")
        )
    triggers = [k for k in SCHEDULE_TRIGGERS if getattr(model.schedule, k) is not None]
    if len(triggers) > 1:
        problems.append(f"[schedule] {', '.join(triggers)}: give one of them, not both")
    if (
        ok("sync", "poll_interval_seconds", "max_poll_interval_seconds")
        and model.sync.max_poll_interval_seconds < model.sync.poll_interval_seconds
    ):
        problems.append(
            "[sync] max_poll_interval_seconds: must be at least poll_interval_seconds "
            f"({model.sync.poll_interval_seconds})"
        )
    healthcheck_url = model.monitoring.healthcheck_url
    if healthcheck_url is not None:
        # Whoever has a ping URL can report on this job: keep it out of every message.
        register_secret(healthcheck_url)
        register_secret(urlsplit(healthcheck_url).path.strip("/") or None)
    metrics_path: Path | None = None
    if model.monitoring.metrics_file is not None:
        metrics_path = base / Path(model.monitoring.metrics_file)
    if problems:
        raise _config_error(path, problems)
    assert db_url is not None
    return Config(
        path=path,
        dingtalk=model.dingtalk,
        database_url=db_url,
        sync=model.sync,
        schedule=model.schedule,
        logging=model.logging,
        chatids=chatids,
        monitoring=model.monitoring,
        metrics_path=metrics_path,
        report=model.report,
        events=model.events,
        busy_timeout_seconds=model.database.busy_timeout_seconds,
    )


def _validate(
    raw: dict[str, Any],
    overrides: Mapping[tuple[str, str], str],
    path: Path,
    problems: list[str],
) -> tuple[_FileModel, set[tuple[str, ...]]]:
    """The validated file and the sections and keys that failed (their problems added).

    On errors the offending keys are dropped and the rest validated again, so that the
    checks after this one still run and the operator gets every problem in one message.
    """
    bad: set[tuple[str, ...]] = set()
    data = raw
    while True:
        try:
            return _FileModel.model_validate(data), bad
        except ValidationError as exc:
            errors = exc.errors()
            new_bad = {tuple(str(part) for part in err["loc"][:2]) for err in errors} - bad
            for description in (_describe(err, overrides) for err in errors):
                if description not in problems:
                    problems.append(description)
            if not new_bad:  # cannot happen: each pass removes what failed
                raise _config_error(path, problems) from None
            bad |= new_bad
            data = _without(raw, bad)


def _check_credentials(
    settings: DingTalkSettings, ok: Callable[..., bool], problems: list[str]
) -> None:
    if not settings.app_key and ok("dingtalk", "app_key"):
        problems.append(f"[dingtalk] app_key: missing (set it in the file or ${ENV_APP_KEY})")
    secret = settings.app_secret
    if (secret is None or not secret.get_secret_value()) and ok("dingtalk", "app_secret"):
        problems.append(f"[dingtalk] app_secret: missing (set it in the file or ${ENV_APP_SECRET})")


def _without(raw: Mapping[str, Any], bad: set[tuple[str, ...]]) -> dict[str, Any]:
    """``raw`` without the sections (1-tuples) and keys (2-tuples) in ``bad``."""
    kept: dict[str, Any] = {}
    for section, value in raw.items():
        if (section,) in bad:
            continue
        if isinstance(value, dict):
            value = {key: item for key, item in value.items() if (section, key) not in bad}
        kept[section] = value
    return kept


def _env_overrides(env: Mapping[str, str]) -> dict[tuple[str, str], str]:
    pairs = {
        ENV_APP_KEY: ("dingtalk", "app_key"),
        ENV_APP_SECRET: ("dingtalk", "app_secret"),
        ENV_DATABASE_URL: ("database", "url"),
    }
    return {target: env[name] for name, target in pairs.items() if env.get(name)}


def _describe(err: Mapping[str, Any], overrides: Mapping[tuple[str, str], str]) -> str:
    loc = [str(part) for part in err["loc"]]
    if not loc:
        return str(err["msg"])
    if len(loc) == 1:
        where = f"[{loc[0]}]"
        if err["type"] == "extra_forbidden":
            return f"[{loc[0]}]: unknown section"
        if err["type"] in {"model_type", "model_attributes_type", "dict_type"}:
            return f"[{loc[0]}]: expected a table (got {err.get('input')!r})"
    else:
        # List indices as ``chatids[3]``, like the messages about chatids built below.
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"][1:])
        where = f"[{loc[0]}] {key.removeprefix('.')}"
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    source = " (from the environment)" if tuple(loc[:2]) in overrides else ""
    got = ""
    # Never echo what may hold a secret: the app secret, or a database URL and its password.
    secret = loc[-1] == "app_secret" or tuple(loc[:2]) == ("database", "url")
    if "input" in err and not isinstance(err["input"], dict) and not secret:
        got = f" (got {err['input']!r})"
    return f"{where}{source}: {err['msg']}{got}"


def _config_error(path: Path, problems: list[str]) -> ConfigError:
    if len(problems) == 1:
        return ConfigError(f"{path}: {problems[0]}")
    lines = "\n".join(f"  - {p}" for p in problems)
    return ConfigError(f"{path}: {len(problems)} configuration problems:\n{lines}")


def _database_url(raw: str, base: Path, *, from_env: bool, problems: list[str]) -> URL | None:
    where = f"[database] url{' (from the environment)' if from_env else ''}"
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        problems.append(f"{where}: not a database URL (e.g. sqlite:///dingtalk_etl.db)")
        return None
    register_secret(url.password if isinstance(url.password, str) else None)
    backend = url.get_backend_name()
    if backend not in {"sqlite", "postgresql", "mysql", "mariadb"}:
        problems.append(
            f"{where}: unsupported database {backend!r} (sqlite, postgresql, mysql, mariadb)"
        )
        return None
    if url.host and "@" in url.host:
        # An unencoded '@' in the password: its tail became the host, and would be shown in
        # every connection error.
        problems.append(f"{where}: '@' in the host name: URL-encode the password ('@' is %40)")
        return None
    if "+" not in url.drivername and backend in _DEFAULT_DRIVERS:
        url = url.set(drivername=f"{backend}+{_DEFAULT_DRIVERS[backend]}")
    if backend in {"mysql", "mariadb"} and "charset" not in url.query:
        # utf8mb4: names and userids may hold characters outside the BMP.
        url = url.update_query_dict({"charset": "utf8mb4"})
    if backend == "sqlite" and url.database and url.database != ":memory:":
        db_path = Path(url.database)
        if not db_path.is_absolute() and not from_env:
            url = url.set(database=str(base / db_path))
    return url


def _check_base_url(
    key: str, url: str, example: str, allow_insecure_http: bool, problems: list[str]
) -> None:
    """``url`` (the setting ``key``) is https, or http to a loopback host, or allowed."""
    switch = (
        "allow_insecure_http"
        if key.startswith("[dingtalk]")
        else ("[dingtalk] allow_insecure_http")
    )
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        problems.append(f"{key}: must be an http(s) URL such as {example} (got {url!r})")
        return
    if (
        parts.scheme == "http"
        and parts.hostname not in _LOOPBACK_HOSTS
        and not parts.hostname.startswith("127.")
        and not allow_insecure_http
    ):
        problems.append(
            f"{key}: plain http:// to a non-loopback host would expose the app "
            f"secret; use https:// or set {switch} = true"
        )


def check_chatid(chatid: str) -> str | None:
    """Why ``chatid`` (already stripped) cannot be a chatid, or None when it can."""
    if not chatid:
        return "empty chatid"
    if len(chatid) > MAX_ID_LENGTH:
        return f"chatid longer than {MAX_ID_LENGTH} characters"
    if any(ord(char) < 32 or ord(char) == 127 for char in chatid):
        return "chatid contains a control character"
    return None


def _collect_chatids(
    sync: SyncSettings, base: Path, problems: list[str], *, report_empty: bool = True
) -> tuple[str, ...]:
    found: list[str] = []
    for index, chatid in enumerate(sync.chatids):
        reason = check_chatid(chatid.strip())
        if reason is not None:
            problems.append(f"[sync] chatids[{index}]: {reason}")
        else:
            found.append(chatid.strip())
    if sync.chatids_file is not None:
        file_path = Path(sync.chatids_file)
        if not file_path.is_absolute():
            file_path = base / file_path
        try:
            lines = file_path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            problems.append(f"[sync] chatids_file: cannot read {file_path}: {reason}")
            lines = []
        for number, line in enumerate(lines, start=1):
            chatid = line.split("#", 1)[0].strip()
            if not chatid:
                continue
            reason = check_chatid(chatid)
            if reason is not None:
                problems.append(f"[sync] chatids_file: {file_path} line {number}: {reason}")
            else:
                found.append(chatid)
    chatids = tuple(dict.fromkeys(found))
    if report_empty and not chatids and not any(p.startswith("[sync] chatids") for p in problems):
        problems.append("[sync] chatids: no chatids configured (set chatids or chatids_file)")
    return chatids


def has_schedule(config: Config) -> bool:
    """Whether ``[schedule]`` says when to run."""
    return any(getattr(config.schedule, key) is not None for key in SCHEDULE_TRIGGERS)
