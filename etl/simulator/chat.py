"""One simulated group chat and the ``chat_info`` object ``chat/get`` answers with.

Boundary: plain data. Locking, change notification and the rules for changing a chat belong to
the world that holds it.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["CHAT_FIELDS", "CHAT_INFO_KEYS", "SimChat"]

# Order of the reference response body; sent in this order so captured payloads look real.
CHAT_INFO_KEYS: Final = (
    "name",
    "owner",
    "useridlist",
    "conversationTag",
    "chatBannedType",
    "searchable",
    "validationType",
    "mentionAllAuthority",
    "managementType",
    "showHistoryType",
    "icon",
    "status",
    "chatid",
)


@dataclass
class SimChat:
    """One group chat as the simulated organisation holds it."""

    chatid: str
    name: str
    owner: str
    useridlist: list[str]
    conversationTag: int = 2
    chatBannedType: int = 0
    searchable: int = 0
    validationType: int = 0
    mentionAllAuthority: int = 0
    managementType: int = 0
    showHistoryType: int = 0
    icon: str = ""
    status: int = 1
    readable: bool = True
    raw_chat_info: dict[str, Any] | None = None

    def chat_info(self) -> dict[str, Any]:
        """The ``chat_info`` object ``chat/get`` answers with (a copy, safe to serialise)."""
        if self.raw_chat_info is not None:
            return copy.deepcopy(self.raw_chat_info)
        info = {key: getattr(self, key) for key in CHAT_INFO_KEYS}
        info["useridlist"] = list(self.useridlist)
        return info


CHAT_FIELDS: Final = tuple(f.name for f in dataclasses.fields(SimChat))
