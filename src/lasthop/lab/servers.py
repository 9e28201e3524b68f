"""The servers inside each VM: HTTP on port 80, TCP echo and UDP echo on
port 7, each on IPv4 and IPv6. One process per VM, started with
`ip netns exec <lab>-vmN python -m lasthop.lab.servers vmN`; it prints
"ready" once every socket listens, and serves until SIGTERM.

The HTTP body is the VM's name, so a client can tell which VM answered.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

from lasthop.lab.plan import ECHO_PORT, HTTP_PORT

__all__ = ["serve", "READY"]

READY = "ready"


def _listener(family: int, kind: int, port: int) -> socket.socket:
    s = socket.socket(family, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    if kind == socket.SOCK_STREAM:
        s.listen(512)
    s.setblocking(False)
    return s


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


def _http(name: str) -> object:
    body = name.encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.write(
                b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            writer.close()

    return handle


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


async def serve(name: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    http = _http(name)
    for family in (socket.AF_INET, socket.AF_INET6):
        await asyncio.start_server(http, sock=_listener(family, socket.SOCK_STREAM, HTTP_PORT))  # type: ignore[arg-type]
        await asyncio.start_server(_echo, sock=_listener(family, socket.SOCK_STREAM, ECHO_PORT))
        await loop.create_datagram_endpoint(
            _UdpEcho, sock=_listener(family, socket.SOCK_DGRAM, ECHO_PORT)
        )
    print(READY, flush=True)
    # Nobody reads stdout after "ready": the lab's `up` may have exited.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    await stop.wait()


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else socket.gethostname()
    asyncio.run(serve(name))


if __name__ == "__main__":
    main()
