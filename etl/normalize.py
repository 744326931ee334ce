"""Pure normalization: a ``chat_info`` payload -> a typed ``ChatRecord``.

No I/O and no imports beyond ``etl.errors``. Anything that does not validate raises
``PayloadError`` naming the field (``chat_info.useridlist[3]: ...``), so the chat fails alone
and nothing of it is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from etl.errors import PayloadError

STATUS_NORMAL: Final = 1
STATUS_DISMISSED: Final = 2
MAX_ID_LENGTH: Final = 128  # the width of the id columns (etl.schema), so the longest id kept
# name and icon: MySQL's TEXT holds 65,535 bytes, 16,383 characters of four UTF-8 bytes. A
# longer value would fail the write there, and a failed write stops the whole run.
MAX_TEXT_LENGTH: Final = 16_000
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")
_KEY_SHOWN = 32
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1

# API key -> ``chats`` column, in the column order of the contract.
_STRING_FIELDS: Final = {"name": "name", "owner": "owner_userid"}
_INT_FLAGS: Final = {
    "conversationTag": "conversation_tag",
    "chatBannedType": "chat_banned_type",
    "searchable": "searchable",
    "validationType": "validation_type",
    "mentionAllAuthority": "mention_all_authority",
    "managementType": "management_type",
    "showHistoryType": "show_history_type",
}
ATTRIBUTE_FIELDS: Final = (
    "name",
    "owner_userid",
    "conversation_tag",
    "chat_banned_type",
    "searchable",
    "validation_type",
    "mention_all_authority",
    "management_type",
    "show_history_type",
    "icon",
    "status",
)

AttrValue = str | int | None


@dataclass(frozen=True, slots=True)
class ChatRecord:
    """One chat as observed. ``members`` is None when the payload gave no member list to trust
    (a dismissed chat with an empty or missing ``useridlist``): membership is then left as is."""

    chatid: str
    attributes: Mapping[str, AttrValue]
    members: frozenset[str] | None
    raw: Mapping[str, Any]
    fingerprint: str

    @property
    def status(self) -> int:
        status = self.attributes["status"]
        assert isinstance(status, int)
        return status

    @property
    def member_count(self) -> int | None:
        return None if self.members is None else len(self.members)


def normalize_chat(chatid: str, chat_info: object) -> ChatRecord:
    """Validate ``chat_info`` (the object, not the whole response) for ``chatid``."""
    if not isinstance(chat_info, dict):
        raise PayloadError(f"chat_info: expected an object, got {_type_name(chat_info)}")
    if not _clean_tree(chat_info):
        _check_tree(chat_info, "chat_info")
    attrs: dict[str, AttrValue] = {}

    for key, column in _STRING_FIELDS.items():
        if key not in chat_info:
            raise PayloadError(f"chat_info.{key}: missing")
        value = chat_info[key]
        if not isinstance(value, str):
            raise PayloadError(f"chat_info.{key}: expected a string, got {_type_name(value)}")
        if len(value) > MAX_TEXT_LENGTH:
            raise PayloadError(f"chat_info.{key}: longer than {MAX_TEXT_LENGTH} characters")
        attrs[column] = value
    owner = attrs["owner_userid"]
    assert isinstance(owner, str)
    check_id(owner, "chat_info.owner")

    for key, column in _INT_FLAGS.items():
        attrs[column] = _optional_int(chat_info, key)

    icon = chat_info.get("icon")
    if icon is not None and not isinstance(icon, str):
        raise PayloadError(f"chat_info.icon: expected a string, got {_type_name(icon)}")
    if icon is not None and len(icon) > MAX_TEXT_LENGTH:
        raise PayloadError(f"chat_info.icon: longer than {MAX_TEXT_LENGTH} characters")
    attrs["icon"] = icon

    if "status" not in chat_info:
        raise PayloadError("chat_info.status: missing")
    status = chat_info["status"]
    if type(status) is not int or status not in (STATUS_NORMAL, STATUS_DISMISSED):
        got = str(status)[:40] if type(status) is int else _type_name(status)
        raise PayloadError(f"chat_info.status: expected 1 or 2, got {got}")
    attrs["status"] = status

    members = _members(chat_info.get("useridlist", None), "useridlist" in chat_info, status)
    return ChatRecord(
        chatid=chatid,
        attributes={column: attrs[column] for column in ATTRIBUTE_FIELDS},
        members=members,
        raw=chat_info,
        fingerprint=fingerprint(chat_info, members),
    )


def fingerprint(chat_info: Mapping[str, Any], members: frozenset[str] | None) -> str:
    """SHA-256 over everything the API said, member order ignored: equal means unchanged.

    ``members`` is the set of ``chat_info["useridlist"]`` (or None, see ``ChatRecord``).
    """
    canonical = dict(chat_info)
    listed = chat_info.get("useridlist")
    if members is None:
        canonical["useridlist"] = None
    elif isinstance(listed, list) and len(listed) == len(members):
        # No duplicates: the list holds exactly the members, and sorting a list that came
        # sorted (or nearly) is a single pass, where sorting the set would start over.
        canonical["useridlist"] = sorted(listed)
    else:
        canonical["useridlist"] = sorted(members)
    text = json.dumps(canonical, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _members(value: object, present: bool, status: int) -> frozenset[str] | None:
    if status == STATUS_DISMISSED and (value is None or value == []):
        return None
    if not present:
        raise PayloadError("chat_info.useridlist: missing")
    if not isinstance(value, list):
        raise PayloadError(f"chat_info.useridlist: expected a list, got {_type_name(value)}")
    if _valid_ids(value):
        return frozenset(value)
    for index, userid in enumerate(value):
        if not isinstance(userid, str):
            raise PayloadError(
                f"chat_info.useridlist[{index}]: expected a string, got {_type_name(userid)}"
            )
        check_id(userid, f"chat_info.useridlist[{index}]")
    return frozenset(value)


def _optional_int(chat_info: Mapping[str, Any], key: str) -> int | None:
    value = chat_info.get(key)
    if value is None:
        return None
    # bool is an int subclass in Python; true/false is not a DingTalk flag.
    if type(value) is not int:
        raise PayloadError(f"chat_info.{key}: expected an integer, got {_type_name(value)}")
    if not _INT_MIN <= value <= _INT_MAX:
        raise PayloadError(f"chat_info.{key}: integer out of range ({value})"[:120])
    return value


def check_id(value: str, where: str) -> None:
    if not value:
        raise PayloadError(f"{where}: empty id")
    if len(value) > MAX_ID_LENGTH:
        raise PayloadError(f"{where}: id longer than {MAX_ID_LENGTH} characters")
    if value != value.strip():
        # MySQL compares 'u1' and 'u1 ' equal (PAD SPACE): two members, one primary key.
        raise PayloadError(f"{where}: id begins or ends with whitespace")


# The two checks below look at a whole member list at C speed (a chat has up to 10,000
# members, and the sync normalizes every chat of every run). A False answer is no verdict:
# the caller then checks item by item, which names the offending item.


def _valid_ids(items: list[Any]) -> bool:
    """Whether every item is a str that ``check_id`` accepts."""
    if not items:
        return True
    if set(map(type, items)) != {str}:
        return False
    return (
        min(map(len, items)) > 0
        and max(map(len, items)) <= MAX_ID_LENGTH
        and list(map(str.strip, items)) == items
    )


def _clean_strings(items: list[Any]) -> bool:
    """Whether every item is a str without NUL or unpaired surrogates."""
    if not items or set(map(type, items)) != {str}:
        return False
    text = "".join(items)
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _clean_tree(value: object, depth: int = 0) -> bool:
    """Whether ``_check_tree`` would accept ``value``, without building its messages."""
    if depth > 32:
        return False
    kind = type(value)
    if kind is str:
        return _clean_strings([value])
    if kind is dict:
        assert isinstance(value, dict)
        return (not value or _clean_strings(list(value))) and all(
            _clean_tree(item, depth + 1) for item in value.values()
        )
    if kind is list:
        assert isinstance(value, list)
        return (depth < 32 and _clean_strings(value)) or all(
            _clean_tree(item, depth + 1) for item in value
        )
    if kind is float:
        assert isinstance(value, float)
        return math.isfinite(value)
    # Subclasses of the above go the long way; everything else (int, bool, None) is fine.
    return not isinstance(value, str | dict | list | float)


def _check_tree(value: object, where: str, depth: int = 0) -> None:
    """Reject what no database can store faithfully: NUL, lone surrogates, absurd nesting."""
    if depth > 32:
        raise PayloadError(f"{where}: nested too deeply")
    if isinstance(value, str):
        if "\x00" in value:
            raise PayloadError(f"{where}: contains a NUL character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise PayloadError(f"{where}: contains an unpaired surrogate") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_tree(key, f"{where} (a key)", depth + 1)
            _check_tree(item, f"{where}{_member(key)}", depth + 1)
    elif isinstance(value, list):
        if depth < 32 and _clean_strings(value):
            return
        for index, item in enumerate(value):
            _check_tree(item, f"{where}[{index}]", depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise PayloadError(f"{where}: {value} is not a JSON number")


def _member(key: str) -> str:
    """``.key`` for plain keys; others quoted and cut, so a key can neither forge nor flood
    the message (nor smuggle terminal escapes into a log)."""
    if _PLAIN_KEY.fullmatch(key):
        return f".{key}"
    shown = key if len(key) <= _KEY_SHOWN else key[:_KEY_SHOWN] + "..."
    return f"[{json.dumps(shown)}]"


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    for kind, name in names.items():
        if type(value) is kind:
            return f"{name} ({value!r})"[:80]
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
