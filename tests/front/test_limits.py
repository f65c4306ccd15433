"""The front's limits and flow control: timeouts, head size, connection cap, 100-continue,
request-body backpressure, client disconnects and shutdown."""

from __future__ import annotations

import asyncio
import json
import socket
import time

from proxy.front.message import Answer, Incoming
from proxy.front.protocol import FrontRequest
from proxy.front.server import FrontLimits, FrontServer
from tests.front import Client, ok_handler, serve


async def test_a_slow_head_is_cut_at_the_header_timeout() -> None:
    async with serve(header_timeout=0.3, idle_timeout=5.0) as front:
        client = await Client.connect(front)
        start = time.monotonic()
        # Slowloris: a byte at a time, never finishing the head.
        for byte in b"GET / HTTP/1.1\r\nHost: a\r\n":
            await client.send(bytes([byte]))
            await asyncio.sleep(0.01)
        reply = await client.read()
        assert reply.status == 408
        assert json.loads(reply.body)["error"]["code"] == "request_timeout"
        assert await client.closed()
        assert 0.25 < time.monotonic() - start < 1.0
        assert front.stats.head_timeouts == 1


async def test_a_connection_that_sends_nothing_closes_at_the_header_timeout() -> None:
    async with serve(header_timeout=0.3, idle_timeout=5.0) as front:
        client = await Client.connect(front)
        start = time.monotonic()
        assert await client.closed(within=2.0)
        assert 0.25 < time.monotonic() - start < 1.0
        assert front.connections == 0


async def test_the_header_timeout_is_per_head_on_a_kept_alive_connection() -> None:
    async with serve(header_timeout=0.3, idle_timeout=5.0) as front:
        client = await Client.connect(front)
        for _ in range(3):
            await asyncio.sleep(0.2)  # in all, longer than the header timeout
            assert (await client.get()).status == 200
        await client.close()


async def test_an_idle_connection_closes_at_the_idle_timeout() -> None:
    async with serve(header_timeout=5.0, idle_timeout=0.3) as front:
        client = await Client.connect(front)
        assert (await client.get()).status == 200
        start = time.monotonic()
        assert await client.closed(within=2.0)
        assert 0.25 < time.monotonic() - start < 1.0
        assert front.stats.idle_closes == 1


async def test_no_timeout_while_a_request_is_handled() -> None:
    async def handler(incoming: Incoming) -> None:
        await asyncio.sleep(0.5)
        await incoming.respond(Answer(200))

    async with serve(handler, header_timeout=0.2, idle_timeout=0.2) as front:
        client = await Client.connect(front)
        assert (await client.get()).status == 200
        await client.close()


async def test_a_head_over_max_header_bytes_gets_431() -> None:
    async with serve(max_header_bytes=4096) as front:
        client = await Client.connect(front)
        # Complete, over the limit.
        await client.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
        reply = await client.read()
        assert reply.status == 431
        assert json.loads(reply.body)["error"] == {
            "code": "header_too_large",
            "message": "the request head is too large (server.max_header_bytes)",
        }
        assert await client.closed()
        # Incomplete and growing: refused without waiting for its end.
        client = await Client.connect(front)
        await client.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ")
        for _ in range(10):
            try:
                await client.send(b"b" * 1000)
            except (ConnectionResetError, BrokenPipeError):
                break
        assert (await client.read()).status == 431
        assert front.stats.heads_too_large == 2
        # Just under the limit is fine.
        client = await Client.connect(front)
        await client.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 3900 + b"\r\n\r\n")
        assert (await client.read()).status == 200
        await client.close()


async def test_a_large_body_in_the_same_read_as_its_head_is_not_a_large_head() -> None:
    async def handler(incoming: Incoming) -> None:
        size = sum([len(chunk) async for chunk in incoming.body()])
        await incoming.respond(Answer(200, str(size).encode()))

    async with serve(handler, max_header_bytes=1024) as front:
        client = await Client.connect(front)
        body = b"x" * 100_000
        await client.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + body)
        assert (await client.read()).body == b"100000"
        await client.close()


async def test_connections_over_the_cap_are_refused() -> None:
    async with serve(max_connections=3) as front:
        clients = [await Client.connect(front) for _ in range(3)]
        for client in clients:
            assert (await client.get()).status == 200
        extra = await Client.connect(front)
        reply = await extra.read()
        assert reply.status == 503
        assert reply.header("Retry-After") is not None
        assert json.loads(reply.body)["error"]["code"] == "too_many_connections"
        assert await extra.closed()
        assert front.stats.refused == 1
        for client in clients:
            assert (await client.get()).status == 200
        await clients[0].close()
        await asyncio.sleep(0.05)
        again = await Client.connect(front)
        assert (await again.get()).status == 200
        assert front.connections == 3


async def test_100_continue_is_sent_only_when_the_handler_asks() -> None:
    bodies: list[bytes] = []

    async def handler(incoming: Incoming) -> None:
        assert incoming.expects_continue
        if incoming.target == "/refuse":
            await incoming.respond(Answer(403, b"no"))
            return
        await asyncio.sleep(0.1)
        await incoming.send_continue()
        bodies.append(b"".join([chunk async for chunk in incoming.body()]))
        await incoming.respond(Answer(200, b"yes"))

    async with serve(handler) as front:
        client = await Client.connect(front)
        head = "POST {} HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        await client.send(head.format("/accept").encode())
        interim = await client.read()
        assert interim.status == 100
        await client.send(b"hello")
        reply = await client.read()
        assert (reply.status, reply.body, reply.header("Connection")) == (200, b"yes", None)
        assert bodies == [b"hello"]

        await client.send(head.format("/refuse").encode())
        reply = await client.read()
        # Not `100 Continue` first; and the client will not send its body: the connection ends.
        assert (reply.status, reply.header("Connection")) == (403, "close")
        assert await client.closed()


async def test_reading_the_body_sends_100_continue_when_not_yet_sent() -> None:
    async def handler(incoming: Incoming) -> None:
        body = b"".join([chunk async for chunk in incoming.body()])
        await incoming.respond(Answer(200, body))

    async with serve(handler) as front:
        client = await Client.connect(front)
        await client.send(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
        )
        assert (await client.read()).status == 100
        await client.send(b"hi")
        assert (await client.read()).body == b"hi"
        await client.close()


async def test_request_body_is_streamed_with_backpressure() -> None:
    seen: list[FrontRequest] = []
    most_buffered = 0
    received = 0
    release = asyncio.Event()

    async def handler(incoming: Incoming) -> None:
        nonlocal most_buffered, received
        assert isinstance(incoming, FrontRequest)
        seen.append(incoming)
        async for chunk in incoming.body():
            received += len(chunk)
            most_buffered = max(most_buffered, incoming._buffered)
            if not release.is_set():
                await asyncio.sleep(0.01)
        await incoming.respond(Answer(200, str(received).encode()))

    total = 64 * 1024 * 1024
    async with serve(handler) as front:
        sock = socket.create_connection(("127.0.0.1", front.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(
            sock, f"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {total}\r\n\r\n".encode()
        )
        sent = 0
        chunk = b"x" * 65536

        async def upload() -> None:
            nonlocal sent
            while sent < total:
                await loop.sock_sendall(sock, chunk)
                sent += len(chunk)

        uploading = asyncio.ensure_future(upload())
        await asyncio.sleep(0.5)
        # The slow reader holds the client back: the upload has stalled far from its end, and
        # the front holds no more than its high-water mark plus one read.
        assert not uploading.done()
        assert sent < total // 4
        assert most_buffered <= 512 * 1024
        assert received <= sent
        release.set()
        await asyncio.wait_for(uploading, 20)
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(str(total).encode()):
            more = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
            assert more
            data += more
        assert data.startswith(b"HTTP/1.1 200 OK\r\n")
        sock.close()


async def test_a_handler_that_ignores_a_large_body_closes_the_connection() -> None:
    async with serve() as front:
        client = await Client.connect(front)
        await client.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000\r\n\r\n")
        await client.send(b"x" * 1000)
        reply = await client.read()
        assert (reply.status, reply.header("Connection")) == (200, "close")
        assert await client.closed()


async def test_a_small_unread_body_that_arrived_whole_keeps_the_connection() -> None:
    async with serve() as front:
        client = await Client.connect(front)
        await client.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
        await asyncio.sleep(0.05)
        assert (await client.read()).header("Connection") in (None, "close")
        await client.close()


async def test_client_disconnect_cancels_the_handler_reading_the_body() -> None:
    cancelled = asyncio.Event()
    started = asyncio.Event()

    async def handler(incoming: Incoming) -> None:
        started.set()
        try:
            async for _ in incoming.body():
                pass
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with serve(handler) as front:
        client = await Client.connect(front)
        await client.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nabc")
        await asyncio.wait_for(started.wait(), 2)
        client.writer.transport.abort()
        await asyncio.wait_for(cancelled.wait(), 2)
        await asyncio.sleep(0.01)
        assert front.connections == 0


async def test_client_disconnect_cancels_a_waiting_handler() -> None:
    cancelled = asyncio.Event()
    started = asyncio.Event()

    async def handler(incoming: Incoming) -> None:
        started.set()
        try:
            await asyncio.sleep(30)  # held for an approval
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with serve(handler) as front:
        client = await Client.connect(front)
        await client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.wait_for(started.wait(), 2)
        await client.close()
        await asyncio.wait_for(cancelled.wait(), 2)


async def test_a_client_closing_its_side_cancels_the_handler() -> None:
    cancelled = asyncio.Event()

    async def handler(incoming: Incoming) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with serve(handler) as front:
        client = await Client.connect(front)
        await client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.sleep(0.05)
        client.writer.write_eof()
        await asyncio.wait_for(cancelled.wait(), 2)
        assert await client.closed()


async def test_shutdown_lets_a_request_in_progress_finish() -> None:
    started = asyncio.Event()

    async def handler(incoming: Incoming) -> None:
        started.set()
        await asyncio.sleep(0.2)
        await incoming.respond(Answer(200, b"done"))

    front = FrontServer(handler, limits=FrontLimits())
    await front.start("127.0.0.1", 0)
    idle = await Client.connect(front)
    assert (await idle.get()).status == 200
    busy = await Client.connect(front)
    await busy.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    await asyncio.wait_for(started.wait(), 2)
    shutting = asyncio.ensure_future(front.shutdown(5.0))
    assert await idle.closed(within=1.0)  # idle: closed at once
    reply = await busy.read()
    assert (reply.body, reply.header("Connection")) == (b"done", "close")
    assert await busy.closed()
    await asyncio.wait_for(shutting, 2)
    assert front.connections == 0
    try:
        await asyncio.open_connection("127.0.0.1", front.port)
        refused = False
    except (OSError, RuntimeError):
        refused = True
    assert refused


async def test_shutdown_cancels_handlers_still_running_after_the_grace() -> None:
    cancelled = asyncio.Event()
    started = asyncio.Event()

    async def handler(incoming: Incoming) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    front = FrontServer(handler, limits=FrontLimits())
    await front.start("127.0.0.1", 0)
    client = await Client.connect(front)
    await client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    await asyncio.wait_for(started.wait(), 2)
    start = time.monotonic()
    await front.shutdown(0.2)
    assert time.monotonic() - start < 1.5
    assert cancelled.is_set()
    assert await client.closed()
    assert front.connections == 0


async def test_many_connections_and_requests() -> None:
    async with serve(ok_handler) as front:

        async def one(i: int) -> None:
            client = await Client.connect(front)
            for j in range(5):
                assert (await client.get(f"/{i}/{j}")).body == f"ok:/{i}/{j}".encode()
            await client.close()

        await asyncio.gather(*(one(i) for i in range(50)))
        assert front.stats.requests == 250


async def test_a_refused_upload_still_reads_its_answer() -> None:
    # The handler answers without reading a large body the client keeps sending: the answer
    # must reach the client, not be lost to a connection reset.
    async def handler(incoming: Incoming) -> None:
        await incoming.respond(Answer(401, b'{"error": "no"}'))

    async with serve(handler) as front:
        client = await Client.connect(front)
        await client.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 50000000\r\n\r\n")

        async def upload() -> None:
            try:
                for _ in range(100):
                    client.writer.write(b"u" * 65536)
                    await client.writer.drain()
            except (ConnectionResetError, BrokenPipeError):
                pass

        uploading = asyncio.ensure_future(upload())
        await asyncio.sleep(0.3)  # the answer waits, unread, while the upload goes on
        reply = await client.read()
        assert (reply.status, reply.header("Connection")) == (401, "close")
        await asyncio.wait_for(uploading, 10)
        assert await client.closed()


async def test_a_stalled_request_body_is_cut_at_the_body_timeout() -> None:
    """Slow-body attacks (R.U.D.Y.): a body being read must keep arriving. Bytes that keep
    coming, however slowly, are not cut; a pause longer than the body timeout is `408`."""
    received: list[int] = []

    async def reads_the_body(incoming: Incoming) -> None:
        size = 0
        async for chunk in incoming.body():
            size += len(chunk)
        received.append(size)
        await incoming.respond(Answer(200, str(size).encode()))

    async with serve(reads_the_body, body_timeout=0.3) as front:
        client = await Client.connect(front)
        await client.send(b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
        for byte in b"12345":  # slow but steady: never 0.3 s without a byte
            await client.send(bytes([byte]))
            await asyncio.sleep(0.1)
        start = time.monotonic()
        reply = await client.read()  # then nothing more: the upload stalls
        assert reply.status == 408
        assert json.loads(reply.body)["error"]["code"] == "request_timeout"
        assert await client.closed()
        assert 0.2 < time.monotonic() - start < 1.5
        assert received == [] and front.stats.body_timeouts == 1
        # A body that arrives in time is read whole.
        client = await Client.connect(front)
        await client.send(b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
        assert (await client.read()).body == b"3"
