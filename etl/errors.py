"""Exception tree of dingtalk-etl, grouped by what the caller should do.

Bottom layer: imports nothing from the rest of the package except ``etl.redact``.

::

    EtlError                      base; ``str()`` never contains a secret
    ├── ConfigError               fix the configuration             exit 78
    │   └── SchemaNotMigrated     run ``dingtalk-etl db upgrade``   exit 78
    ├── LockHeld                  another sync runs; do nothing     exit 75
    ├── TransientError            retry with backoff (-1, 90018, 5xx, 429, resets, non-JSON)
    ├── TokenError                refresh the access token once, then retry (40001/40014/42001)
    ├── ChatError                 record on the chat's run item, go on with the others
    │   └── PayloadError          chat_info failed validation (names the field)
    └── FatalError                stop the run, call no more APIs   exit 3
        ├── FatalApiError         43007, 70001, 40089, 90020, token refused twice
        ├── DatabaseError         the database failed or is unreachable
        └── RunInterrupted        SIGTERM/SIGINT or the run's time budget ran out

``ApiError`` is a mix-in carrying ``errcode`` and ``http_status`` for the API-facing classes.
Transient errors that exhaust ``max_attempts`` become a ``ChatError`` for that chat.
"""

from __future__ import annotations

from etl.redact import redact


class EtlError(Exception):
    """Base of every error this package raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(EtlError):
    """The configuration (file, environment, options) is invalid; nothing was done."""


class SchemaNotMigrated(ConfigError):
    """The database schema is not at the head revision."""


class LockHeld(EtlError):
    """Another sync holds this database's lock."""


class ApiError(EtlError):
    """An answer (or non-answer) of the DingTalk API."""

    def __init__(
        self, message: str, *, errcode: int | None = None, http_status: int | None = None
    ) -> None:
        super().__init__(message)
        self.errcode = errcode
        self.http_status = http_status


class TransientError(ApiError):
    """Worth retrying after a pause; ``wait`` is the server-requested pause, if any."""

    def __init__(
        self,
        message: str,
        *,
        errcode: int | None = None,
        http_status: int | None = None,
        wait: float | None = None,
        throttled: bool = False,
    ) -> None:
        super().__init__(message, errcode=errcode, http_status=http_status)
        self.wait = wait
        self.throttled = throttled


class TokenError(ApiError):
    """The access token was refused; refresh it once and try again."""


class ChatError(ApiError):
    """This chat cannot be synced in this run; the others go on."""


class PayloadError(ChatError):
    """``chat_info`` did not validate; the message names the field."""


class FatalError(EtlError):
    """The run cannot go on: every remaining chat would fail too."""


class FatalApiError(FatalError, ApiError):
    """The API refused the app as a whole (permission, credentials, quota)."""

    def __init__(
        self, message: str, *, errcode: int | None = None, http_status: int | None = None
    ) -> None:
        ApiError.__init__(self, message, errcode=errcode, http_status=http_status)


class DatabaseError(FatalError):
    """The database failed; the chat in hand was rolled back."""


class RunInterrupted(FatalError):
    """The run was asked to stop (signal or time budget)."""
