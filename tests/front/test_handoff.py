"""Control-plane requests lent to aiohttp's server, on connections that also carry proxied ones."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp import web

from proxy.front.handoff import ControlSession
from proxy.front.message import Answer, Incoming
from proxy.front.server import FrontLimits, FrontServer
from tests.front import Client, serve

CANCELLED = "cancelled"


@pytest.fixture
async def control() -> AsyncIterator[tuple[web.Server, dict[str, asyncio.Event]]]:
    events = {CANCELLED: asyncio.Event(), "started": asyncio.Event()}

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "path": request.raw_path})

    async def info(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "remote": request.remote,
                "path": request.raw_path,
                "query": dict(request.query),
                "version": list(request.version),
                "x": request.headers.get("X-Thing"),
            }
        )

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(body=body, headers={"X-Length": str(len(body))})

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(3):
            await response.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    async def closing(request: web.Request) -> web.Response:
        response = web.Response(text="bye")
        response.force_close()
        return response

    async def slow(request: web.Request) -> web.Response:
        events["started"].set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            events[CANCELLED].set()
            raise
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/_countersign", health)
    app.router.add_get("/_countersign/info", info)
    app.router.add_post("/_countersign/echo", echo)
    app.router.add_get("/_countersign/stream", stream)
    app.router.add_get("/_countersign/close", closing)
    app.router.add_get("/_countersign/slow", slow)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    assert runner.server is not None
    yield runner.server, events
    await runner.cleanup()


async def proxied(incoming: Incoming) -> None:
    await incoming.respond(Answer(200, b"proxied:" + incoming.target.encode()))


Control = tuple[web.Server, dict[str, asyncio.Event]]


async def test_one_connection_alternates_proxied_and_control_requests(control: Control) -> None:
    server, _ = control
    async with serve(proxied, control=server) as front:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{front.port}") as http:
            for i in range(3):
                response = await http.get(f"/api/{i}")
                assert response.text == f"proxied:/api/{i}"
                response = await http.get(f"/_countersign/info?i={i}", headers={"X-Thing": "t"})
                assert response.status_code == 200
                assert response.headers.get("Connection") is None
                assert response.json() == {
                    "remote": "127.0.0.1",
                    "path": f"/_countersign/info?i={i}",
                    "query": {"i": str(i)},
                    "version": [1, 1],
                    "x": "t",
                }
                response = await http.post("/_countersign/echo", content=b"x" * 1000)
                assert response.content == b"x" * 1000
            assert (await http.get("/_countersign")).json()["ok"] is True
        assert front.stats.accepted == 1
        assert front.stats.requests == 10
        assert len(server.connections) == 0  # every lent handler was given its connection_lost


async def test_the_prefix_is_matched_exactly(control: Control) -> None:
    server, _ = control
    async with serve(proxied, control=server) as front:
        client = await Client.connect(front)
        assert (await client.get("/_countersignx")).body == b"proxied:/_countersignx"
        assert (await client.get("/_countersign?x=1")).status == 200
        assert (await client.get("/api/_countersign/info")).body.startswith(b"proxied:")
        await client.close()


async def test_pipelined_mix_is_answered_in_order(control: Control) -> None:
    server, _ = control
    async with serve(proxied, control=server) as front:
        client = await Client.connect(front)
        await client.send(
            b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /_countersign/info HTTP/1.1\r\nHost: a\r\n\r\n"
            b"POST /_countersign/echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
            b"GET /two HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /_countersign/stream HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /three HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        assert (await client.read()).body == b"proxied:/one"
        assert json.loads((await client.read()).body)["path"] == "/_countersign/info"
        assert (await client.read()).body == b"hello"
        assert (await client.read()).body == b"proxied:/two"
        streamed = await client.read()
        assert streamed.header("Transfer-Encoding") == "chunked"
        assert streamed.body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        assert (await client.read()).body == b"proxied:/three"
        assert front.connections == 1
        await client.close()


async def test_chunked_control_post_is_read_whole(control: Control) -> None:
    server, _ = control
    async with serve(proxied, control=server) as front:
        client = await Client.connect(front)
        await client.send(
            b"POST /_countersign/echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
        )
        reply = await client.read()
        assert (reply.body, reply.header("X-Length")) == (b"abcdefg", "7")
        assert (await client.get("/after")).body == b"proxied:/after"
        await client.close()


async def test_control_post_with_100_continue(control: Control) -> None:
    server, _ = control
    async with serve(proxied, control=server) as front:
        client = await Client.connect(front)
        await client.send(
            b"POST /_countersign/echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        assert (await client.read()).status == 100
        await client.send(b"ok")
        assert (await client.read()).body == b"ok"
        await client.close()


@pytest.mark.parametrize("chunked", [False, True])
async def test_control_body_over_the_limit_gets_413(control: Control, chunked: bool) -> None:
    server, _ = control
    async with serve(proxied, control=server, max_body_bytes=1000) as front:
        client = await Client.connect(front)
        if chunked:
            await client.send(
                b"POST /_countersign/echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"%x\r\n" % 1500
                + b"y" * 1500
                + b"\r\n"
            )
        else:
            await client.send(
                b"POST /_countersign/echo HTTP/1.1\r\nHost: a\r\nContent-Length: 1500\r\n\r\n"
            )
        reply = await client.read()
        assert (reply.status, reply.header("Connection")) == (413, "close")
        assert json.loads(reply.body)["error"]["code"] == "payload_too_large"
        assert await client.closed()


async def test_control_answer_closing_closes_the_connection(control: Control) -> None:
    server, _ = control
    async with serve(proxied, control=server) as front:
        client = await Client.connect(front)
        reply = await client.get("/_countersign/close")
        assert (reply.body, reply.header("Connection")) == (b"bye", "close")
        assert await client.closed()


async def test_client_asking_to_close_on_a_control_request(control: Control) -> None:
    server, _ = control
    async with serve(proxied, control=server) as front:
        client = await Client.connect(front)
        await client.send(b"GET /_countersign HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        reply = await client.read()
        assert (reply.status, reply.header("Connection")) == (200, "close")
        assert await client.closed()
        client = await Client.connect(front)
        await client.send(b"GET /_countersign/info HTTP/1.0\r\n\r\n")
        reply = await client.read()
        assert json.loads(reply.body)["version"] == [1, 0]
        assert await client.closed()


async def test_client_disconnect_cancels_the_control_handler(control: Control) -> None:
    server, events = control
    async with serve(proxied, control=server) as front:
        client = await Client.connect(front)
        await client.send(b"GET /_countersign/slow HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.wait_for(events["started"].wait(), 2)
        await client.close()
        await asyncio.wait_for(events[CANCELLED].wait(), 2)
        await asyncio.sleep(0.05)
        assert front.connections == 0
        assert len(server.connections) == 0


async def test_without_control_the_prefix_goes_to_the_handler() -> None:
    front = FrontServer(proxied, limits=FrontLimits())
    await front.start("127.0.0.1", 0)
    client = await Client.connect(front)
    assert (await client.get("/_countersign/info")).body == b"proxied:/_countersign/info"
    await client.close()
    await front.shutdown(1.0)


async def test_a_large_control_answer_to_a_slow_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    # aiohttp waits on the client's socket (pause_writing/resume_writing are forwarded to it),
    # and the connection is usable afterwards.
    pauses: list[bool] = []
    pause, resume = ControlSession.pause_writing, ControlSession.resume_writing

    def pausing(session: ControlSession) -> None:
        pauses.append(True)
        pause(session)

    def resuming(session: ControlSession) -> None:
        pauses.append(False)
        resume(session)

    monkeypatch.setattr(ControlSession, "pause_writing", pausing)
    monkeypatch.setattr(ControlSession, "resume_writing", resuming)
    chunk = b"z" * 65536

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(160):  # 10 MiB
            await response.write(chunk)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/_countersign/big", big)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    assert runner.server is not None
    try:
        async with serve(proxied, control=runner.server) as front:
            client = await Client.connect(front)
            await client.send(b"GET /_countersign/big HTTP/1.1\r\nHost: a\r\n\r\n")
            await asyncio.sleep(0.3)  # the socket buffers fill; aiohttp must wait
            reply = await client.read(within=20)
            assert reply.body == chunk * 160
            assert pauses[:2] == [True, False]
            assert (await client.get("/next")).body == b"proxied:/next"
            await client.close()
    finally:
        await runner.cleanup()
