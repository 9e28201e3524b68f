"""How the API server (lasthop.api.ApiServer) stops: at once when no request
is under way, and only after the response when one is. Served on a unix
socket in a temporary folder, by a small app: no root, no agent."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
from fastapi import FastAPI

from lasthop.api import ApiServer

WAIT = 10.0  # the longest any step here may take (a slow first CI run); none waits for it


def _app(entered: threading.Event, release: threading.Event) -> FastAPI:
    app = FastAPI()

    @app.get("/quick")
    def quick() -> dict[str, str]:
        return {"answer": "quick"}

    @app.get("/held")
    def held() -> dict[str, str]:
        entered.set()
        release.wait(WAIT)
        return {"answer": "held"}

    return app


def _client(sock: Path) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=WAIT)


def test_a_stop_with_an_idle_kept_alive_client_ends_the_server_and_removes_its_socket(
    tmp_path: Path,
) -> None:
    sock = tmp_path / "api.sock"
    server = ApiServer(_app(threading.Event(), threading.Event()), unix_path=sock)
    server.start()
    with _client(sock) as client:
        assert client.get("http://api/quick").json() == {"answer": "quick"}
        server.stop()  # the client's connection is still open, idle
        assert server._thread is not None and not server._thread.is_alive()
        assert not sock.exists()


def test_a_stop_while_a_request_is_under_way_waits_for_its_response(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    entered, release = threading.Event(), threading.Event()
    server = ApiServer(_app(entered, release), unix_path=sock)
    server.start()
    answers: list[httpx.Response] = []

    def ask() -> None:
        with _client(sock) as client:
            answers.append(client.get("http://api/held"))

    asker = threading.Thread(target=ask)
    asker.start()
    stopper = threading.Thread(target=server.stop)
    try:
        assert entered.wait(WAIT), "the request never reached its handler"
        stopper.start()
        stopper.join(0.3)
        assert stopper.is_alive(), "the stop did not wait for the request under way"
    finally:
        release.set()
        asker.join(WAIT)
        if stopper.ident is None:
            server.stop()  # the test failed before its stop
        else:
            stopper.join(WAIT)
    assert [(a.status_code, a.json()) for a in answers] == [(200, {"answer": "held"})]
    assert not stopper.is_alive() and not sock.exists()
