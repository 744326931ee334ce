"""Tests for etl.simulator: the local DingTalk server, exercised over real HTTP."""

from __future__ import annotations

import ast
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

import etl.simulator
from etl.simulator import (
    CHAT_INFO_KEYS,
    DingTalkApi,
    Fault,
    SimChat,
    Simulator,
    World,
    WorldChange,
)

FIXTURES = Path(__file__).parent / "fixtures"
KEY = "k-test"
SECRET = "s-test"

REFERENCE_CHAT_INFO_KEYS = {
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
}


def make_world(**app: Any) -> World:
    world = World(KEY, SECRET, **app)
    world.add_chat(SimChat("c-ok", "All-staff Chat", "manager4220", ["user123", "manager4220"]))
    world.add_chat(SimChat("c-hidden", "Hidden", "u1", ["u1"], readable=False))
    world.add_chat(SimChat("c-raw", "Raw", "u1", ["u1"], raw_chat_info={"name": 5, "extra": [1]}))
    return world


@pytest.fixture
def world() -> World:
    return make_world()


@pytest.fixture
def sim(world: World) -> Iterator[Simulator]:
    with Simulator(world) as simulator:
        yield simulator


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def gettoken(
    http: requests.Session, sim: Simulator, key: str = KEY, secret: str = SECRET
) -> dict[str, Any]:
    response = http.get(f"{sim.base_url}/gettoken", params={"appkey": key, "appsecret": secret})
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def token(http: requests.Session, sim: Simulator) -> str:
    return str(gettoken(http, sim)["access_token"])


def chat_get(http: requests.Session, sim: Simulator, chatid: str, tok: str) -> requests.Response:
    return http.get(
        f"{sim.base_url}/chat/get", params={"access_token": tok, "chatid": chatid}, timeout=5
    )


# -- gettoken --------------------------------------------------------------------------------


def test_gettoken_issues_and_reuses_token(http: requests.Session, sim: Simulator) -> None:
    first = gettoken(http, sim)
    second = gettoken(http, sim)
    assert first["errcode"] == 0
    assert first["errmsg"] == "ok"
    assert len(first["access_token"]) == 32
    int(first["access_token"], 16)
    assert first["expires_in"] == 7200
    assert second["access_token"] == first["access_token"]
    assert sim.stats.gettoken_calls == 2
    assert sim.stats.tokens_issued == 1


@pytest.mark.parametrize("how", ["ttl-elapsed", "expire_token"], ids=["ttl", "expire_token()"])
def test_token_expiry_gives_42001_and_new_token(how: str, http: requests.Session) -> None:
    world = make_world(token_ttl_seconds=0.3 if how == "ttl-elapsed" else 7200)
    with Simulator(world) as sim:
        old = token(http, sim)
        assert chat_get(http, sim, "c-ok", old).json()["errcode"] == 0
        if how == "ttl-elapsed":
            time.sleep(0.35)
        else:
            world.expire_token()
        assert chat_get(http, sim, "c-ok", old).json()["errcode"] == 42001
        new = token(http, sim)
        assert new != old
        assert chat_get(http, sim, "c-ok", new).json()["errcode"] == 0
        assert chat_get(http, sim, "c-ok", old).json()["errcode"] == 42001


def test_gettoken_extends_lifetime(http: requests.Session) -> None:
    world = make_world(token_ttl_seconds=1.0)
    with Simulator(world) as sim:
        first = token(http, sim)
        [issued] = sim.stats.arrivals("/gettoken")
        # Fetched every 0.1 s (each within a lifetime of the one before, however loaded the
        # machine), the same token lives on past its first lifetime.
        while time.monotonic() < issued + 1.5:
            assert token(http, sim) == first
            time.sleep(0.1)
        assert chat_get(http, sim, "c-ok", first).json()["errcode"] == 0
        assert sim.stats.arrivals("/chat/get")[0] > issued + 1.0
        assert sim.stats.tokens_issued == 1


@pytest.mark.parametrize(
    ("params", "errcode"),
    [
        ({"appkey": "wrong", "appsecret": SECRET}, 40089),
        ({"appkey": KEY, "appsecret": "wrong"}, 40089),
        ({"appkey": "", "appsecret": SECRET}, 90002),
        ({"appsecret": SECRET}, 90002),
        ({"appkey": KEY, "appsecret": ""}, 90003),
        ({"appkey": KEY}, 90003),
    ],
    ids=["wrong-key", "wrong-secret", "empty-key", "missing-key", "empty-secret", "no-secret"],
)
def test_gettoken_errors(
    params: dict[str, str], errcode: int, http: requests.Session, sim: Simulator
) -> None:
    response = http.get(f"{sim.base_url}/gettoken", params=params)
    assert response.status_code == 200
    body = response.json()
    assert body["errcode"] == errcode
    assert body["errmsg"]
    assert "access_token" not in body
    if errcode == 40089:
        assert body["errmsg"] == "invalid appkey or appsecret"


# -- chat/get --------------------------------------------------------------------------------


def test_chat_get_success_shape(http: requests.Session, sim: Simulator) -> None:
    response = chat_get(http, sim, "c-ok", token(http, sim))
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.raw.version == 11
    body = response.json()
    assert list(body) == ["errcode", "errmsg", "chat_info"]
    assert set(body["chat_info"]) == REFERENCE_CHAT_INFO_KEYS
    assert list(body["chat_info"]) == list(CHAT_INFO_KEYS)
    assert body["chat_info"] == {
        "name": "All-staff Chat",
        "owner": "manager4220",
        "useridlist": ["user123", "manager4220"],
        "conversationTag": 2,
        "chatBannedType": 0,
        "searchable": 0,
        "validationType": 0,
        "mentionAllAuthority": 0,
        "managementType": 0,
        "showHistoryType": 0,
        "icon": "",
        "status": 1,
        "chatid": "c-ok",
    }


def test_raw_chat_info_sent_verbatim(http: requests.Session, sim: Simulator) -> None:
    body = chat_get(http, sim, "c-raw", token(http, sim)).json()
    assert body == {"errcode": 0, "errmsg": "ok", "chat_info": {"name": 5, "extra": [1]}}


@pytest.mark.parametrize(
    ("chatid", "tok", "errcode"),
    [
        ("c-unknown", "valid", 40016),
        ("c-hidden", "valid", 40016),
        (None, "valid", 49000),
        ("", "valid", 49000),
        ("c-ok", None, 40014),
        ("c-ok", "0" * 32, 40014),
    ],
    ids=["unknown-chat", "unreadable", "missing-chatid", "empty-chatid", "no-token", "bad-token"],
)
def test_chat_get_errors(
    chatid: str | None, tok: str | None, errcode: int, http: requests.Session, sim: Simulator
) -> None:
    params = {"chatid": chatid, "access_token": token(http, sim) if tok == "valid" else tok}
    response = http.get(f"{sim.base_url}/chat/get", params=params)
    assert response.status_code == 200
    assert response.json()["errcode"] == errcode
    assert "chat_info" not in response.json()


def test_permission_false_gives_43007_on_every_chat(
    world: World, http: requests.Session, sim: Simulator
) -> None:
    tok = token(http, sim)
    world.permission = False
    for chatid in ("c-ok", "c-hidden", "c-unknown"):
        assert chat_get(http, sim, chatid, tok).json()["errcode"] == 43007


def test_unknown_path_is_html_404(http: requests.Session, sim: Simulator) -> None:
    response = http.get(f"{sim.base_url}/user/get", params={"userid": "x"})
    assert response.status_code == 404
    assert response.headers["Content-Type"].startswith("text/html")
    assert "404" in response.text
    assert http.post(f"{sim.base_url}/chat/get", data=b"x").status_code == 405


def test_world_mutations_visible_while_serving(
    world: World, http: requests.Session, sim: Simulator
) -> None:
    tok = token(http, sim)
    world.add_members("c-ok", ["new1", "user123"])
    world.remove_members("c-ok", ["manager4220"])
    world.set_attr("c-ok", name="Renamed", owner="new1")
    info = chat_get(http, sim, "c-ok", tok).json()["chat_info"]
    assert info["useridlist"] == ["user123", "new1"]
    assert (info["name"], info["owner"]) == ("Renamed", "new1")
    with world.lock:
        world.chat("c-ok").icon = "@icon"
    assert chat_get(http, sim, "c-ok", tok).json()["chat_info"]["icon"] == "@icon"
    assert world.membership()["c-ok"] == frozenset({"user123", "new1"})
    with pytest.raises(AttributeError, match="nope"):
        world.set_attr("c-ok", nope=1)
    with pytest.raises(KeyError, match="c-missing"):
        world.chat("c-missing")


@pytest.mark.parametrize("keep", [False, True], ids=["members-emptied", "members-kept"])
def test_dismiss(keep: bool, world: World, http: requests.Session, sim: Simulator) -> None:
    world.dismiss("c-ok", keep_members=keep)
    info = chat_get(http, sim, "c-ok", token(http, sim)).json()["chat_info"]
    assert info["status"] == 2
    assert info["useridlist"] == (["user123", "manager4220"] if keep else [])


# -- faults ----------------------------------------------------------------------------------


FAULT_ANSWERS: list[tuple[str, int, dict[str, Any] | str]] = [
    ("errcode:-1", 200, {"errcode": -1, "errmsg": "系统繁忙"}),
    ("errcode:88", 200, {"errcode": 88}),
    ("errcode:90018", 200, {"errcode": 90018}),
    ("errcode:40001", 200, {"errcode": 40001}),
    ("errcode:43007", 200, {"errcode": 43007}),
    ("errcode:70001", 200, {"errcode": 70001}),
    ("errcode:90020", 200, {"errcode": 90020}),
    ("errcode:12345", 200, {"errcode": 12345}),
    ("http:502", 502, "502 Bad Gateway"),
    ("http:429", 429, "429 Too Many Requests"),
    ("http:500", 500, "500 Internal Server Error"),
    ("http:403", 403, "403 Forbidden"),
    ("nonjson", 200, "<html"),
    ("block:7", 200, {"status": 1111, "wait": 7, "punish": "deny"}),
]


@pytest.mark.parametrize(
    ("spec", "status", "expected"), FAULT_ANSWERS, ids=[case[0] for case in FAULT_ANSWERS]
)
def test_fault_answers(
    spec: str,
    status: int,
    expected: dict[str, Any] | str,
    world: World,
    http: requests.Session,
    sim: Simulator,
) -> None:
    tok = token(http, sim)
    world.inject("c-ok", spec)
    response = chat_get(http, sim, "c-ok", tok)
    assert response.status_code == status
    if isinstance(expected, str):
        assert response.headers["Content-Type"].startswith("text/html")
        assert expected in response.text
        with pytest.raises(json.JSONDecodeError):
            json.loads(response.text)
    else:
        body = response.json()
        assert body.items() >= expected.items()
        if "errcode" in expected:
            assert isinstance(body["errmsg"], str)
            assert body["errmsg"]
        else:
            assert "errcode" not in body
    if spec == "errcode:88":
        assert "90018" in response.json()["errmsg"]
    # consumed once: the next call is answered normally
    assert chat_get(http, sim, "c-ok", tok).json()["errcode"] == 0


@pytest.mark.parametrize(
    ("spec", "errors"),
    [
        ("reset", (requests.ConnectionError,)),
        ("truncate", (requests.exceptions.ChunkedEncodingError, requests.ConnectionError)),
    ],
    ids=["reset", "truncate"],
)
def test_broken_connection_faults(
    spec: str,
    errors: tuple[type[Exception], ...],
    world: World,
    http: requests.Session,
    sim: Simulator,
) -> None:
    tok = token(http, sim)
    world.inject("c-ok", spec)
    with pytest.raises(errors):
        chat_get(http, sim, "c-ok", tok).json()
    # the server survives and the same session reconnects
    assert chat_get(http, sim, "c-ok", tok).json()["errcode"] == 0


def test_slow_fault_delays_then_answers(
    world: World, http: requests.Session, sim: Simulator
) -> None:
    tok = token(http, sim)
    world.inject("c-ok", "slow:0.3")
    started = time.monotonic()
    assert chat_get(http, sim, "c-ok", tok).json()["errcode"] == 0
    assert time.monotonic() - started >= 0.3


def test_slow_fault_times_out_client(world: World, http: requests.Session, sim: Simulator) -> None:
    tok = token(http, sim)
    world.inject("c-ok", "slow:0.5")
    with pytest.raises(requests.Timeout):
        http.get(
            f"{sim.base_url}/chat/get", params={"access_token": tok, "chatid": "c-ok"}, timeout=0.1
        )


def test_expire_token_fault(world: World, http: requests.Session, sim: Simulator) -> None:
    tok = token(http, sim)
    world.inject("c-ok", "expire_token")
    assert chat_get(http, sim, "c-ok", tok).json()["errcode"] == 42001
    assert token(http, sim) != tok


def test_faults_fifo_per_chat_consumed_once(
    world: World, http: requests.Session, sim: Simulator
) -> None:
    tok = token(http, sim)
    world.inject("c-ok", "errcode:-1", "http:502")
    world.inject("c-ok", "errcode:90005")
    world.inject("c-hidden", "errcode:70001")
    assert world.pending_faults("c-ok") == ["errcode:-1", "http:502", "errcode:90005"]
    assert chat_get(http, sim, "c-ok", tok).json()["errcode"] == -1
    assert chat_get(http, sim, "c-ok", tok).status_code == 502
    assert chat_get(http, sim, "c-ok", tok).json()["errcode"] == 90005
    assert chat_get(http, sim, "c-ok", tok).json()["errcode"] == 0
    assert chat_get(http, sim, "c-hidden", tok).json()["errcode"] == 70001
    assert chat_get(http, sim, "c-hidden", tok).json()["errcode"] == 40016
    assert world.pending_faults("c-ok") == []
    assert sim.stats.requests_by_chat == {"c-ok": 4, "c-hidden": 2}
    assert sim.stats.faults_fired == {"errcode": 3, "http": 1}


def test_gettoken_faults(world: World, http: requests.Session, sim: Simulator) -> None:
    world.inject("@gettoken", "errcode:-1", "http:503")
    assert gettoken(http, sim) == {"errcode": -1, "errmsg": "系统繁忙"}
    assert http.get(f"{sim.base_url}/gettoken").status_code == 503
    assert gettoken(http, sim)["errcode"] == 0


@pytest.mark.parametrize(
    "spec",
    ["errcode", "errcode:x", "http:99", "http:600", "block:-1", "slow:abc", "reset:1", "boom"],
)
def test_invalid_fault_spec(spec: str, world: World) -> None:
    with pytest.raises(ValueError, match="fault"):
        world.inject("c-ok", spec)


def test_fault_parse() -> None:
    assert Fault.parse("slow:1.5") == Fault("slow", 1.5, "slow:1.5")
    assert Fault.parse("http:429").value == 429


# -- rate limit, latency, stats --------------------------------------------------------------


def test_rate_limit_per_api(http: requests.Session) -> None:
    world = make_world(rate_limit=3)
    with Simulator(world) as sim:
        tok = token(http, sim)
        bodies = [chat_get(http, sim, "c-ok", tok).json() for _ in range(6)]
        ok = [b for b in bodies if b["errcode"] == 0]
        throttled = [b for b in bodies if b["errcode"] == 88]
        assert len(ok) == 3
        assert len(throttled) == 3
        assert all("subcode=90018" in b["errmsg"] for b in throttled)
        assert sim.stats.throttled == 3
        assert sim.stats.throttled_by_path == {"/chat/get": 3}
        # gettoken has its own window (1 call used so far)
        assert gettoken(http, sim)["errcode"] == 0
        time.sleep(1.05)
        assert chat_get(http, sim, "c-ok", tok).json()["errcode"] == 0


def test_throttled_request_does_not_consume_fault(http: requests.Session) -> None:
    world = make_world(rate_limit=1)
    with Simulator(world) as sim:
        tok = token(http, sim)
        assert chat_get(http, sim, "c-ok", tok).json()["errcode"] == 0
        world.inject("c-ok", "errcode:-1")
        assert chat_get(http, sim, "c-ok", tok).json()["errcode"] == 88
        assert world.pending_faults("c-ok") == ["errcode:-1"]


def test_latency(http: requests.Session) -> None:
    world = make_world(latency_ms=150)
    with Simulator(world) as sim:
        started = time.monotonic()
        gettoken(http, sim)
        assert time.monotonic() - started >= 0.15


def test_stats_windows(http: requests.Session, sim: Simulator) -> None:
    tok = token(http, sim)
    for _ in range(3):
        chat_get(http, sim, "c-ok", tok)
    time.sleep(0.3)
    for _ in range(2):
        chat_get(http, sim, "c-hidden", tok)
    stats = sim.stats
    assert stats.requests_by_path == {"/gettoken": 1, "/chat/get": 5}
    assert stats.total_requests == 6
    assert stats.max_requests_in_any_window("/chat/get", window=0.2) == 3
    assert stats.max_requests_in_any_window("chat/get", window=10) == 5
    assert stats.max_requests_in_any_window("/gettoken") == 1
    assert stats.max_requests_in_any_window("/never") == 0
    stats.reset()
    assert stats.total_requests == 0


def test_concurrent_clients(world: World, sim: Simulator) -> None:
    with requests.Session() as session:
        tok = token(session, sim)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with requests.Session() as session:
                for _ in range(10):
                    assert chat_get(session, sim, "c-ok", tok).json()["errcode"] == 0
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sim.stats.requests_by_chat["c-ok"] == 80


# -- server lifecycle ------------------------------------------------------------------------


def test_stop_is_idempotent_and_closes_keepalive(world: World, http: requests.Session) -> None:
    sim = Simulator(world).start()
    assert sim.base_url.startswith("http://127.0.0.1:")
    assert gettoken(http, sim)["errcode"] == 0  # leaves an idle keep-alive connection
    sim.stop()
    sim.stop()
    with pytest.raises(requests.ConnectionError):
        http.get(f"{sim.base_url}/gettoken", timeout=2)
    with pytest.raises(RuntimeError):
        sim.start()


def test_serve_forever_ends_on_stop(world: World) -> None:
    sim = Simulator(world)
    runner = threading.Thread(target=sim.serve_forever)
    runner.start()
    with requests.Session() as session:
        assert gettoken(session, sim)["errcode"] == 0
    sim.stop()
    runner.join(timeout=5)
    assert not runner.is_alive()


def test_serve_forever_ends_on_signal_handler_stop(world: World) -> None:
    sim = Simulator(world)
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: sim.stop())
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        timer.start()
        started = time.monotonic()
        sim.serve_forever()  # the handler runs on this (main) thread
        assert time.monotonic() - started < 3
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)


# -- generated worlds ------------------------------------------------------------------------


def test_generate_is_deterministic_and_bounded() -> None:
    a = World.generate(200, seed=7, users=3000, min_members=10, max_members=2000, dismissed=5)
    b = World.generate(200, seed=7, users=3000, min_members=10, max_members=2000, dismissed=5)
    c = World.generate(200, seed=8, users=3000, min_members=10, max_members=2000, dismissed=5)
    assert a.membership() == b.membership()
    assert [a.chats[k].name for k in a.chatids()] == [b.chats[k].name for k in b.chatids()]
    assert a.membership() != c.membership()
    assert a.chatids()[0] == "gen-000001"
    assert a.chatids()[-1] == "gen-000200"
    active = [chat for chat in a.chats.values() if chat.status == 1]
    assert len(active) == 195
    sizes = sorted(len(chat.useridlist) for chat in active)
    assert sizes[0] >= 10
    assert sizes[-1] <= 2000
    assert sizes[len(sizes) // 2] < 100  # most groups are small
    assert sizes[-1] > 500  # but some are large
    assert all(chat.owner in chat.useridlist for chat in active)
    assert all(u.startswith("user-") for chat in active for u in chat.useridlist)
    dismissed = [chat for chat in a.chats.values() if chat.status == 2]
    assert len(dismissed) == 5
    assert all(chat.useridlist == [] for chat in dismissed)
    # users are shared across chats
    counts: dict[str, int] = {}
    for chat in active:
        for userid in chat.useridlist:
            counts[userid] = counts.get(userid, 0) + 1
    assert max(counts.values()) > 5


def test_generate_includes_max_size_group() -> None:
    world = World.generate(3, seed=1, users=50, max_members=10000)
    assert len(world.chat("gen-000001").useridlist) == 10000


@pytest.mark.parametrize("share", [0.0, 0.1, 0.5, 1.0], ids=["0%", "10%", "50%", "100%"])
def test_mutate_changes_requested_share(share: float) -> None:
    world = World.generate(60, seed=3, max_members=500, dismissed=10)
    twin = World.generate(60, seed=3, max_members=500, dismissed=10)
    before = {cid: (c.name, c.owner, list(c.useridlist)) for cid, c in world.chats.items()}
    changed = world.mutate(share, seed=11)
    assert twin.mutate(share, seed=11) == changed
    assert world.membership() == twin.membership()
    assert changed == round(share * 50)
    after = {cid: (c.name, c.owner, list(c.useridlist)) for cid, c in world.chats.items()}
    differing = [cid for cid in before if before[cid] != after[cid]]
    assert len(differing) == changed
    assert all(world.chats[cid].status == 1 for cid in differing)
    assert all(c.owner in c.useridlist for c in world.chats.values() if c.status == 1)


def test_mutate_rejects_bad_share(world: World) -> None:
    with pytest.raises(ValueError, match="share"):
        world.mutate(1.5, seed=0)


# -- scenarios -------------------------------------------------------------------------------


def test_from_scenario_fixture(http: requests.Session) -> None:
    world = World.from_scenario(FIXTURES / "scenario_small.toml")
    assert world.chatids() == ["chat-eng", "chat-finance", "chat-old-project", "chat-private"]
    assert world.chat("chat-old-project").status == 2
    assert not world.chat("chat-private").readable
    with Simulator(world) as sim:
        tok = str(gettoken(http, sim, "demo-key", "demo-secret")["access_token"])
        finance = chat_get(http, sim, "chat-finance", tok).json()["chat_info"]
        assert finance["useridlist"] == ["u001", "u002", "u003"]
        old = chat_get(http, sim, "chat-old-project", tok).json()["chat_info"]
        assert (old["status"], old["useridlist"]) == (2, [])
        assert chat_get(http, sim, "chat-private", tok).json()["errcode"] == 40016


def test_from_scenario_with_faults(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        '[app]\napp_key = "a"\napp_secret = "b"\nrate_limit = 20\n'
        '[[chats]]\nchatid = "x"\nname = "X"\nowner = "u"\nuseridlist = ["u"]\n'
        "raw_chat_info = { name = 5 }\n"
        '[faults]\n"x" = ["errcode:-1", "http:502"]\n"@gettoken" = ["reset"]\n',
        encoding="utf-8",
    )
    world = World.from_scenario(path)
    assert (world.app_key, world.app_secret, world.rate_limit) == ("a", "b", 20)
    assert world.chat("x").raw_chat_info == {"name": 5}
    assert world.pending_faults("x") == ["errcode:-1", "http:502"]
    assert world.pending_faults("@gettoken") == ["reset"]


@pytest.mark.parametrize(
    ("text", "bad"),
    [
        ("colour = 1\n", "colour"),
        ("[app]\napp_kee = 'x'\n", "app_kee"),
        ("[[chats]]\nchatid='c'\nname='n'\nowner='o'\nuseridlist=[]\nmembers=[]\n", "members"),
        ("[app]\nrate_limit = 'fast'\n", "rate_limit"),
        ("[[chats]]\nchatid='c'\nname='n'\nowner='o'\nuseridlist=[]\nstatus='x'\n", "status"),
        ("[[chats]]\nchatid='c'\nname='n'\nowner='o'\n", "useridlist"),
        ("[faults]\nc = ['explode']\n", "explode"),
        ("[app\n", "invalid TOML"),
    ],
    ids=[
        "top",
        "app",
        "chat",
        "bad-type",
        "bad-chat-type",
        "missing-field",
        "bad-fault",
        "not-toml",
    ],
)
def test_from_scenario_errors(text: str, bad: str, tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=bad) as excinfo:
        World.from_scenario(path)
    assert "broken.toml" in str(excinfo.value)


# -- change listeners ------------------------------------------------------------------------


Change = tuple[str, str, tuple[str, ...], str, Any, Any]

CHANGE_CASES: list[tuple[str, Callable[[World], object], list[Change]]] = [
    (
        "join",
        lambda w: w.add_members("c-ok", ["new1", "user123", "new2", "new1"]),
        [("members_added", "c-ok", ("new1", "new2"), "", None, None)],
    ),
    ("join-nobody-new", lambda w: w.add_members("c-ok", ["user123"]), []),
    (
        "leave",
        lambda w: w.remove_members("c-ok", ["ghost", "manager4220", "user123"]),
        [("members_removed", "c-ok", ("user123", "manager4220"), "", None, None)],
    ),
    ("leave-nobody-there", lambda w: w.remove_members("c-ok", ["ghost"]), []),
    (
        "rename-same-owner",
        lambda w: w.set_attr("c-ok", name="Renamed", owner="manager4220"),
        [("attribute_changed", "c-ok", (), "name", "All-staff Chat", "Renamed")],
    ),
    (
        "dismiss",
        lambda w: w.dismiss("c-ok"),
        [("dismissed", "c-ok", (), "", None, None)],
    ),
    (
        "dismiss-twice",
        lambda w: (w.dismiss("c-ok"), w.dismiss("c-ok", keep_members=True)),
        [("dismissed", "c-ok", (), "", None, None)],
    ),
]


def as_tuple(change: WorldChange) -> Change:
    return (change.kind, change.chatid, change.userids, change.field, change.old, change.new)


@pytest.mark.parametrize(
    ("act", "expected"),
    [case[1:] for case in CHANGE_CASES],
    ids=[case[0] for case in CHANGE_CASES],
)
def test_listeners_see_each_change(
    act: Callable[[World], object], expected: list[Change], world: World
) -> None:
    seen: list[WorldChange] = []
    before = time.time()
    world.subscribe(seen.append)
    act(world)
    assert [as_tuple(change) for change in seen] == expected
    assert all(before <= change.at <= time.time() for change in seen)


def test_unsubscribed_listener_hears_nothing_more(world: World) -> None:
    seen: list[WorldChange] = []
    unsubscribe = world.subscribe(seen.append)
    world.add_members("c-ok", ["new1"])
    unsubscribe()
    unsubscribe()
    world.add_members("c-ok", ["new2"])
    assert [change.userids for change in seen] == [("new1",)]


def test_mutate_reaches_listeners_change_by_change() -> None:
    world = World.generate(40, seed=5, max_members=300, dismissed=4)
    replayed = {cid: (c.name, c.owner, list(c.useridlist)) for cid, c in world.chats.items()}
    seen: list[WorldChange] = []
    world.subscribe(seen.append)
    changed = world.mutate(0.5, seed=9)
    for change in seen:
        name, owner, members = replayed[change.chatid]
        if change.kind == "members_added":
            members = members + list(change.userids)
        elif change.kind == "members_removed":
            members = [m for m in members if m not in change.userids]
        elif change.field == "name":
            name = change.new
        else:
            assert change.field == "owner"
            owner = change.new
        replayed[change.chatid] = (name, owner, members)
    assert replayed == {cid: (c.name, c.owner, c.useridlist) for cid, c in world.chats.items()}
    assert len({change.chatid for change in seen}) == changed == 18


# -- fronts ----------------------------------------------------------------------------------


def test_a_second_front_shares_tokens_faults_and_stats(
    world: World, http: requests.Session, sim: Simulator
) -> None:
    """What another front (such as a push gateway) gets by going through DingTalkApi."""
    api = DingTalkApi(world)
    issued = api.gettoken(KEY, SECRET).body
    assert issued is not None
    assert token(http, sim) == issued["access_token"]
    world.inject("c-ok", "http:502", "errcode:-1")
    answer = api.chat_get(issued["access_token"], "c-ok")
    assert (answer.body, answer.fault) == (None, Fault("http", 502, "http:502"))
    assert chat_get(http, sim, "c-ok", issued["access_token"]).json()["errcode"] == -1
    assert sim.stats.requests_by_chat == {"c-ok": 2}
    assert sim.stats.gettoken_calls == 2


# -- boundary --------------------------------------------------------------------------------


def test_package_imports_only_the_standard_library_and_websockets() -> None:
    """Nothing from the rest of etl; besides the standard library, only ``websockets``, and
    only in the Stream-mode front."""
    package = Path(etl.simulator.__file__).parent
    foreign = []
    websockets_users = set()
    for module in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                own = name == "etl.simulator" or name.startswith("etl.simulator.")
                if top == "websockets":
                    websockets_users.add(module.name)
                elif not (own or top == "__future__" or top in sys.stdlib_module_names):
                    foreign.append(f"{module.name}: {name}")
    assert foreign == []
    assert websockets_users == {"stream.py"}
