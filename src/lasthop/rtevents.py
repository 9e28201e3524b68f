"""rtnetlink event sockets: what the link, neighbour and route watches share.

A plain netlink socket with pyroute2's parser, not a second IPRoute: IPRoute
reads ahead into its own buffer, so select() on its fd missed events already
read."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

EVENT_BUFFER = 1 << 20  # bytes of events the kernel may queue for one socket


def event_socket(groups: int) -> socket.socket:
    """A netlink socket subscribed to the rtnetlink multicast *groups*
    (RTMGRP_* bits of linux/rtnetlink.h), with room for EVENT_BUFFER bytes;
    it never blocks."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, EVENT_BUFFER)
        sock.bind((0, groups))
        sock.setblocking(False)  # read by queued() when select() says so
    except BaseException:
        sock.close()
        raise
    return sock


def queued(sock: socket.socket) -> Iterator[bytes | None]:
    """The datagrams queued on *sock* now, without blocking; None where the
    kernel dropped events (ENOBUFS: the caller reads the state again)."""
    while True:
        try:
            data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as err:
            if err.errno != errno.ENOBUFS:
                raise
            yield None
            continue
        yield data
