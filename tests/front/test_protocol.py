"""The data-plane front over real sockets: keep-alive, pipelining, strict parsing, answers."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from proxy.front.message import Answer, Incoming
from tests.front import Client, serve


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    peers: list[object] = []

    async def handler(incoming: Incoming) -> None:
        peers.append(incoming.remote)
        await incoming.respond(Answer(200, b"hello", [("Content-Type", "text/plain")]))

    async with serve(handler) as front:
        client = await Client.connect(front)
        for _ in range(3):
            reply = await client.get("/x")
            assert reply.status == 200
            assert reply.body == b"hello"
            assert reply.header("Content-Length") == "5"
            assert reply.header("Connection") is None
            assert reply.header("Date") is not None
        assert front.connections == 1
        assert peers == ["127.0.0.1"] * 3
        await client.close()


async def test_httpx_reuses_one_connection() -> None:
    async with serve() as front:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{front.port}") as http:
            for i in range(5):
                response = await http.get(f"/n{i}")
                assert response.status_code == 200
                assert response.text == f"ok:/n{i}"
        assert front.stats.accepted == 1
        assert front.stats.requests == 5


async def test_pipelined_requests_are_answered_in_order() -> None:
    running = 0
    most = 0

    async def handler(incoming: Incoming) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        # The first takes longest: answers must still come back in order.
        await asyncio.sleep({"/1": 0.2, "/2": 0.05, "/3": 0.0}[incoming.target])
        running -= 1
        await incoming.respond(Answer(200, incoming.target.encode()))

    async with serve(handler) as front:
        client = await Client.connect(front)
        await client.send(
            b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        bodies = [(await client.read()).body for _ in range(3)]
        assert bodies == [b"/1", b"/2", b"/3"]
        assert most == 1  # one request handled at a time
        await client.close()


async def test_raw_target_is_kept_byte_for_byte() -> None:
    seen: list[str] = []

    async def handler(incoming: Incoming) -> None:
        seen.append(incoming.target)
        await incoming.respond(Answer(204))

    async with serve(handler) as front:
        client = await Client.connect(front)
        targets = ["/a/%2F/../b?x=%41", "/a//b/./c?q=%zz&&x=1#frag", '/odd|{}^`"<>', "*"]
        for target in targets:
            reply = await client.get(target)
            assert reply.status == 204
        assert seen == targets
        await client.close()


async def test_a_raw_non_ascii_byte_in_the_target_is_refused() -> None:
    # llhttp's strict mode (RFC 9112) allows only ASCII in the request target: a raw 0xFF is
    # not valid HTTP/1.1 (a client percent-encodes it).
    async with serve() as front:
        client = await Client.connect(front)
        await client.send(b"GET /a\xff?x=\xfe HTTP/1.1\r\nHost: a\r\n\r\n")
        reply = await client.read()
        assert reply.status == 400
        assert b"\xff" not in reply.body
        assert await client.closed()


async def test_raw_headers_keep_their_bytes_and_order() -> None:
    seen: list[Incoming] = []

    async def handler(incoming: Incoming) -> None:
        seen.append(incoming)
        await incoming.respond(Answer(200))

    async with serve(handler) as front:
        client = await Client.connect(front)
        await client.send(
            b"GET / HTTP/1.1\r\nHost: example.test:8080\r\nX-Name: caf\xe9\r\n"
            b"x-dup: 1\r\nX-DUP: 2\r\n\r\n"
        )
        assert (await client.read()).status == 200
        (incoming,) = seen
        assert incoming.raw_headers == (
            (b"Host", b"example.test:8080"),
            (b"X-Name", b"caf\xe9"),
            (b"x-dup", b"1"),
            (b"X-DUP", b"2"),
        )
        assert incoming.headers["x-name"].encode("utf-8", "surrogateescape") == b"caf\xe9"
        assert incoming.headers.getall("X-Dup") == ["1", "2"]
        assert incoming.host == "example.test:8080"
        assert incoming.version == (1, 1)
        assert incoming.scheme == "http"
        assert incoming.remote == "127.0.0.1"
        assert incoming.body_exists is False
        assert incoming.content_length is None
        assert incoming.upgrade is None
        await client.close()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: a\r\n\r\n",
        b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\n\n",
        b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Content-Length: 5\r\n\r\nhello",
    ],
    ids=[
        "cl+te",
        "duplicate-cl",
        "cl-list",
        "obs-fold",
        "bad-token",
        "bad-request-line",
        "bare-lf",
        "http2",
        "te-not-chunked-last",
        "two-hosts",
        "no-host",
        "upgrade-with-body",
    ],
)
async def test_invalid_requests_get_400_and_the_connection_closes(request_bytes: bytes) -> None:
    called = False

    async def handler(incoming: Incoming) -> None:
        nonlocal called
        called = True
        await incoming.respond(Answer(200))

    async with serve(handler) as front:
        client = await Client.connect(front)
        await client.send(request_bytes)
        reply = await client.read()
        assert reply.status == 400
        assert reply.header("Connection") == "close"
        error = json.loads(reply.body)["error"]
        assert error == {"code": "invalid_request", "message": "the request is not valid HTTP/1.1"}
        assert await client.closed()
        assert not called
        assert front.stats.parse_errors == 1


async def test_bad_chunk_fails_the_body_reader_and_the_front_answers_400() -> None:
    failures: list[BaseException] = []

    async def handler(incoming: Incoming) -> None:
        try:
            async for _ in incoming.body():
                pass
        except Exception as exc:
            failures.append(exc)
            raise

    async with serve(handler) as front:
        client = await Client.connect(front)
        await client.send(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n"
        )
        reply = await client.read()
        assert reply.status == 400
        assert await client.closed()
        assert len(failures) == 1


async def test_an_error_after_a_good_request_is_answered_in_turn() -> None:
    async with serve() as front:
        client = await Client.connect(front)
        await client.send(b"GET /good HTTP/1.1\r\nHost: a\r\n\r\nGET /x HTTP/9.9\r\n\r\n")
        first = await client.read()
        assert (first.status, first.body) == (200, b"ok:/good")
        assert (await client.read()).status == 400
        assert await client.closed()


async def test_chunked_request_body_is_decoded() -> None:
    bodies: list[bytes] = []

    async def handler(incoming: Incoming) -> None:
        if incoming.method == "POST":
            assert incoming.body_exists
            assert incoming.content_length is None
        bodies.append(b"".join([chunk async for chunk in incoming.body()]))
        await incoming.respond(Answer(200))

    async with serve(handler) as front:
        client = await Client.connect(front)
        await client.send(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nTrailer: x\r\n\r\n"
        )
        assert (await client.read()).status == 200
        assert bodies == [b"abcde"]
        assert (await client.get()).status == 200  # the connection is still usable
        assert bodies == [b"abcde", b""]
        await client.close()


async def test_handler_without_answer_gets_500() -> None:
    async def handler(incoming: Incoming) -> None:
        return None

    async with serve(handler) as front:
        client = await Client.connect(front)
        reply = await client.get()
        assert reply.status == 500
        assert json.loads(reply.body)["error"]["code"] == "internal_error"
        assert (await client.get()).status == 500  # still keep-alive
        await client.close()


async def test_handler_raising_before_answering_gets_500() -> None:
    async def handler(incoming: Incoming) -> None:
        raise RuntimeError("boom")

    async with serve(handler) as front:
        client = await Client.connect(front)
        reply = await client.get()
        assert reply.status == 500
        assert b"boom" not in reply.body
        assert front.stats.handler_errors == 1
        await client.close()


async def test_handler_raising_mid_stream_aborts_the_connection() -> None:
    async def handler(incoming: Incoming) -> None:
        await incoming.start(200, [("Content-Type", "text/plain")])
        await incoming.write(b"partial")
        raise RuntimeError("boom")

    async with serve(handler) as front:
        client = await Client.connect(front)
        await client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        with pytest.raises((asyncio.IncompleteReadError, ConnectionResetError)):
            await client.read()


async def test_streamed_answer_is_chunked() -> None:
    async def handler(incoming: Incoming) -> None:
        await incoming.start(200, [("Content-Type", "text/event-stream")])
        for i in range(3):
            await incoming.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(0.01)
        await incoming.write(b"")  # nothing: not the last chunk
        await incoming.finish()

    async with serve(handler) as front:
        client = await Client.connect(front)
        reply = await client.get()
        assert reply.header("Transfer-Encoding") == "chunked"
        assert reply.chunks == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
        assert (await client.get()).status == 200
        await client.close()
        async with (
            httpx.AsyncClient() as http,
            http.stream("GET", f"http://127.0.0.1:{front.port}/") as response,
        ):
            parts = [part async for part in response.aiter_bytes()]
            assert b"".join(parts) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


async def test_streamed_answer_with_length_and_a_short_one_aborts() -> None:
    async def handler(incoming: Incoming) -> None:
        await incoming.start(200, [("Content-Length", "999")], content_length=6)
        await incoming.write(b"abc")
        if incoming.target == "/short":
            await incoming.finish()
        await incoming.write(b"def")
        await incoming.finish()

    async with serve(handler) as front:
        client = await Client.connect(front)
        reply = await client.get()
        assert reply.all("Content-Length") == ["6"]
        assert reply.body == b"abcdef"
        await client.send(b"GET /short HTTP/1.1\r\nHost: a\r\n\r\n")
        with pytest.raises((asyncio.IncompleteReadError, ConnectionResetError)):
            await client.read()


async def test_answer_headers_are_kept_in_order_with_our_framing() -> None:
    async def handler(incoming: Incoming) -> None:
        await incoming.respond(
            Answer(
                201,
                b"abc",
                [
                    ("Set-Thing", "1"),
                    ("Content-Length", "999"),
                    ("Transfer-Encoding", "chunked"),
                    ("Connection", "keep-alive"),
                    ("set-thing", "2"),
                    ("Date", "yesterday"),
                ],
                reason="Made It",
            )
        )

    async with serve(handler) as front:
        client = await Client.connect(front)
        reply = await client.get()
        assert (reply.status, reply.reason) == (201, "Made It")
        assert reply.headers == [
            ("Set-Thing", "1"),
            ("set-thing", "2"),
            ("Date", "yesterday"),
            ("Content-Length", "3"),
        ]
        assert reply.body == b"abc"
        await client.close()


async def test_header_with_crlf_is_refused_not_sent() -> None:
    async def handler(incoming: Incoming) -> None:
        await incoming.respond(Answer(200, headers=[("X-Bad", "a\r\nInjected: 1")]))

    async with serve(handler) as front:
        client = await Client.connect(front)
        reply = await client.get()
        assert reply.status == 500
        assert reply.header("Injected") is None
        await client.close()


async def test_head_answer_keeps_the_given_length_and_sends_no_body() -> None:
    async def handler(incoming: Incoming) -> None:
        assert incoming.method == "HEAD"
        await incoming.respond(Answer(200, headers=[("Content-Length", "1234")]))

    async with serve(handler) as front:
        client = await Client.connect(front)
        await client.send(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
        reply = await client.read(head=True)
        assert reply.all("Content-Length") == ["1234"]
        await client.send(b"HEAD /again HTTP/1.1\r\nHost: a\r\n\r\n")
        # Had a body been sent, this would read it as a status line.
        assert (await client.read(head=True)).status == 200
        await client.close()


async def test_no_body_statuses_carry_no_length() -> None:
    async def handler(incoming: Incoming) -> None:
        await incoming.respond(Answer(int(incoming.target[1:]), b"ignored"))

    async with serve(handler) as front:
        client = await Client.connect(front)
        for status in (204, 304):
            reply = await client.get(f"/{status}")
            assert reply.status == status
            assert reply.header("Content-Length") is None
        assert (await client.get("/200")).body == b"ignored"
        await client.close()


async def test_connection_close_is_honoured_both_ways() -> None:
    async def handler(incoming: Incoming) -> None:
        if incoming.target == "/bye":
            incoming.close_after()
        await incoming.respond(Answer(200))

    async with serve(handler) as front:
        client = await Client.connect(front)
        await client.send(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert (await client.read()).header("Connection") == "close"
        assert await client.closed()
        client = await Client.connect(front)
        reply = await client.get("/bye")
        assert reply.header("Connection") == "close"
        assert await client.closed()


async def test_http10_closes_unless_keep_alive_and_streams_until_close() -> None:
    seen_hosts: list[str] = []

    async def handler(incoming: Incoming) -> None:
        seen_hosts.append(incoming.host)
        if incoming.target == "/stream":
            await incoming.start(200, [])
            await incoming.write(b"one ")
            await incoming.write(b"two")
            await incoming.finish()
        else:
            await incoming.respond(Answer(200, b"x"))

    async with serve(handler) as front:
        client = await Client.connect(front)
        seen_hosts.clear()
        await client.send(b"GET / HTTP/1.0\r\n\r\n")
        assert (await client.read()).header("Connection") == "close"
        assert seen_hosts == [f"127.0.0.1:{front.port}"]
        assert await client.closed()
        client = await Client.connect(front)
        await client.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert (await client.read()).header("Connection") == "keep-alive"
        await client.send(b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        reply = await client.read()
        assert reply.header("Transfer-Encoding") is None
        assert reply.header("Connection") == "close"
        assert reply.body == b"one two"


async def test_other_expectations_reach_the_handler() -> None:
    async def handler(incoming: Incoming) -> None:
        assert not incoming.expects_continue
        await incoming.respond(Answer(417, headers=[("X-Expect", incoming.headers["Expect"])]))

    async with serve(handler) as front:
        client = await Client.connect(front)
        await client.send(b"GET / HTTP/1.1\r\nHost: a\r\nExpect: something\r\n\r\n")
        reply = await client.read()
        assert (reply.status, reply.header("X-Expect")) == (417, "something")
        await client.close()


async def test_upgrade_is_an_ordinary_request_and_the_connection_ends_after() -> None:
    seen: list[str | None] = []

    async def handler(incoming: Incoming) -> None:
        seen.append(incoming.upgrade)
        await incoming.respond(Answer(403, b"no"))

    async with serve(handler) as front:
        client = await Client.connect(front)
        await client.send(
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            b"\x81\x00"
        )
        reply = await client.read()
        assert (reply.status, reply.header("Connection")) == (403, "close")
        assert await client.closed()
        assert seen == ["websocket"]


async def test_switch_hands_the_connection_to_a_tunnel() -> None:
    async def handler(incoming: Incoming) -> None:
        tunnel = await incoming.switch([("Connection", "Upgrade"), ("Upgrade", "echo")])
        while data := await tunnel.read():
            await tunnel.write(data.upper())
        tunnel.close()

    async with serve(handler) as front:
        client = await Client.connect(front)
        await client.send(
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nhello"
        )
        reply = await client.read(head=True)
        assert reply.status == 101
        assert reply.headers == [("Connection", "Upgrade"), ("Upgrade", "echo")]
        assert await client.reader.readexactly(5) == b"HELLO"
        await client.send(b"more")
        assert await client.reader.readexactly(4) == b"MORE"
        assert front.connections == 1
        client.writer.write_eof()
        assert await client.closed()
        await asyncio.sleep(0.05)
        assert front.connections == 0


async def test_connect_is_an_ordinary_request() -> None:
    async def handler(incoming: Incoming) -> None:
        assert incoming.upgrade is None
        await incoming.respond(Answer(405))

    async with serve(handler) as front:
        client = await Client.connect(front)
        await client.send(b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n")
        assert (await client.read()).status == 405
        assert await client.closed()


async def test_a_long_pipeline_is_answered_whole_and_in_order() -> None:
    async def handler(incoming: Incoming) -> None:
        await asyncio.sleep(0)
        await incoming.respond(Answer(200, incoming.target.encode()))

    async with serve(handler) as front:
        client = await Client.connect(front)
        await client.send(b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(2000)))
        for i in range(2000):
            assert (await client.read()).body == b"/%d" % i
        await client.close()


def test_the_front_runs_on_uvloop() -> None:
    import uvloop

    async def handler(incoming: Incoming) -> None:
        if incoming.upgrade:
            tunnel = await incoming.switch([("Upgrade", "echo"), ("Connection", "Upgrade")])
            while data := await tunnel.read():
                await tunnel.write(data)
            tunnel.close()
            return
        body = b"".join([chunk async for chunk in incoming.body()])
        if incoming.target == "/stream":
            await incoming.start(200, [])
            await incoming.write(body)
            await incoming.finish()
        else:
            await incoming.respond(Answer(200, body))

    async def scenario() -> None:
        async with serve(handler) as front:
            client = await Client.connect(front)
            await client.send(
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
                b"POST /stream HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"2\r\nde\r\n0\r\n\r\n"
            )
            assert (await client.read()).body == b"abc"
            assert (await client.read()).chunks == [b"de"]
            await client.send(
                b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n"
            )
            assert (await client.read(head=True)).status == 101
            await client.send(b"ping")
            assert await client.reader.readexactly(4) == b"ping"
            await client.close()

    uvloop.run(scenario())
