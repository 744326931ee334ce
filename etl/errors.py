"""Exception tree of dingtalk-etl, grouped by what the caller should do, and the exit codes.

Bottom layer: imports nothing from the rest of the package except ``etl.redact``.

::

    EtlError                      base; ``str()`` never contains a secret   exit 3
    ├── ConfigError               fix the configuration                     exit 78
    │   └── SchemaNotMigrated     run ``dingtalk-etl db upgrade``           exit 78
    ├── LockBusy                  another sync runs; nothing was done       exit 75
    ├── QuotaExhausted            DingTalk said 90020 this month: wait for the next one
    ├── NoAnswer                  the synced data cannot answer a report    exit 1
    ├── TransientError            retry with backoff (-1, 90018, 5xx, 429, resets, non-JSON)
    ├── TokenError                refresh the access token once, then retry (40001/40014/42001)
    ├── RequestFailed             this request cannot succeed; the caller says whose failure
    ├── ChatError                 record on the chat's run item, go on with the others
    │   └── PayloadError          chat_info failed validation (names the field)
    ├── FatalError                stop the run, call no more APIs           exit 3
    │   ├── FatalApiError         43007, 70001, 40089, 90020, token refused twice, no token
    │   └── DatabaseFailure       the database failed or is unreachable
    │       └── LockLost          the sync lock went with its database session
    └── RunInterrupted            a stop signal, not an error: SIGTERM/SIGINT or the time budget

``ApiError`` is a mix-in carrying ``errcode`` and ``http_status`` for the API-facing classes.
Transient errors that exhaust ``max_attempts`` become ``RequestFailed``, which the client turns
into a ``ChatError`` for chat/get and a ``FatalApiError`` for gettoken.

``RunInterrupted`` is how a stopped run unwinds a worker that was waiting to call the API
(the pacer, a retry pause). The run then ends on its stop reason: ``partial`` if some chats
synced, else ``failed``; a scheduler's run stopped by SIGTERM is no failure of the scheduler.

Exit codes are the contract's, in ``ExitCode``; an error's code is its class's ``exit_code``,
and ``exit_code_for`` is the one mapping from any exception to a code.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Sequence
from typing import ClassVar

from etl.redact import redact


class ExitCode(enum.IntEnum):
    """The contract's exit codes; several meanings share 1."""

    OK = 0
    PARTIAL = 1  # `sync`: the run finished, some chats failed
    UNHEALTHY = 1  # `status`: no success within --max-age, or none at all
    NO_ANSWER = 1  # `report`: unknown chat or user, or a time before the first sync
    USAGE = 2
    FAILED = 3
    LOCKED = 75
    CONFIG = 78


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code of a command that ends with ``exc``: its class's, else FAILED."""
    return exc.exit_code if isinstance(exc, EtlError) else ExitCode.FAILED


def describe_exception(exc: BaseException) -> str:
    """A one-line reason without secrets, for any exception."""
    if isinstance(exc, EtlError):
        return exc.message
    return redact(f"{type(exc).__name__}: {exc}")


class EtlError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code: ClassVar[ExitCode] = ExitCode.FAILED

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(EtlError):
    """The configuration (file, environment, options) is invalid; nothing was done."""

    exit_code = ExitCode.CONFIG


class SchemaNotMigrated(ConfigError):
    """The database schema is not at the head revision."""


class LockBusy(EtlError):
    """Another sync holds this database's lock; nothing was done."""

    exit_code = ExitCode.LOCKED


class QuotaExhausted(EtlError):
    """DingTalk answered 90020 this quota month: no call until ``resets_at``."""

    def __init__(self, message: str, *, resets_at: dt.datetime) -> None:
        super().__init__(message)
        self.resets_at = resets_at

    def __reduce__(self) -> tuple[object, ...]:
        # Crosses the pipe from the reconcile process with its keyword argument.
        return (_quota_exhausted, (self.message, self.resets_at))


def _quota_exhausted(message: str, resets_at: dt.datetime) -> QuotaExhausted:
    return QuotaExhausted(message, resets_at=resets_at)


class NoAnswer(EtlError):
    """The synced data cannot answer a report's question: an unknown chat or user, a name that
    several chats share, or a time before the chat's first sync.

    The attributes say what was asked: ``chat`` (a chatid or name), ``chatids`` (the chats a
    name matched), ``userid``, ``as_of`` and the chat's ``first_synced_at`` (UTC).
    """

    exit_code = ExitCode.NO_ANSWER

    def __init__(
        self,
        message: str,
        *,
        chat: str | None = None,
        chatids: Sequence[str] = (),
        userid: str | None = None,
        as_of: dt.datetime | None = None,
        first_synced_at: dt.datetime | None = None,
    ) -> None:
        super().__init__(message)
        self.chat = chat
        self.chatids = tuple(chatids)
        self.userid = userid
        self.as_of = as_of
        self.first_synced_at = first_synced_at


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


class RequestFailed(ApiError):
    """This request cannot succeed (an unknown errcode, HTTP 4xx, retries used up)."""


class ChatError(ApiError):
    """This chat cannot be synced in this run; the others go on."""


class PayloadError(ChatError):
    """``chat_info`` did not validate; the message names the field."""


class FatalError(EtlError):
    """The run cannot go on: every remaining chat would fail too."""


class FatalApiError(FatalError, ApiError):
    """The API refused the app as a whole (permission, credentials, quota)."""


class DatabaseFailure(FatalError):
    """The database failed; the chat in hand was rolled back."""


class LockLost(DatabaseFailure):
    """The sync lock ended with its database session while the run went on."""


class RunInterrupted(EtlError):
    """The run was asked to stop (signal or time budget): a stop, not a failure."""
