#!/usr/bin/env python3
"""Minimal TCP load generator for bench/policy-scale.sh.

  rr.py serve PORT [BIND] [MAX_SECONDS]   echo server (selectors, one thread)
  rr.py conn IP PORT [DURATION]           new connections/s: connect, 64 B
                                          request, 64 B response, close
  rr.py rr   IP PORT [DURATION]           request/responses/s on one connection

Clients print one number (operations/s) and nothing else. One outstanding
operation at a time: a latency-bound measurement. DURATION (default 5 s) is
capped at 60 s; the server exits after MAX_SECONDS (default 900, cap 3600).
The client closes with SO_LINGER 0 (RST) so that no TIME_WAIT state piles up;
in conn mode it picks source ports itself, in sequence over 10000-64999, or
over LO..HI-1 with RR_PORTS=LO-HI in the environment (rr mode then binds its
one connection to port HI): runs given disjoint ranges never meet each
other's conntrack entries.
"""
import os
import errno
import selectors
import socket
import struct
import sys
import time

MSG = 64
REQ = b"q" * MSG
LINGER0 = struct.pack("ii", 1, 0)
IO_TIMEOUT = 2.0
PORT_LO, PORT_HI = 10000, 65000  # client source ports in conn mode
if os.environ.get("RR_PORTS"):
    PORT_LO, PORT_HI = (int(p) for p in os.environ["RR_PORTS"].split("-"))


def serve(port, bind="0.0.0.0", max_seconds=900.0):
    deadline = time.monotonic() + min(max_seconds, 3600.0)
    sel = selectors.DefaultSelector()
    ls = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((bind, port))
    ls.listen(1024)
    ls.setblocking(False)
    sel.register(ls, selectors.EVENT_READ, None)
    buf = bytearray(4096)
    view = memoryview(buf)
    while time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1.0):
            s = key.fileobj
            if s is ls:
                try:
                    c, _ = ls.accept()
                except OSError:
                    continue
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                c.setblocking(False)
                sel.register(c, selectors.EVENT_READ, None)
                continue
            try:
                n = s.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                n = 0
            if n:
                try:
                    s.sendall(view[:n])  # 64 B always fits the send buffer
                    continue
                except OSError:
                    pass
            sel.unregister(s)
            s.close()


def conn(ip, port, duration):
    addr = (ip, port)
    buf = bytearray(MSG)
    view = memoryview(buf)
    create = socket.create_connection
    now = time.monotonic
    NODELAY, TCP = socket.TCP_NODELAY, socket.IPPROTO_TCP
    SOL, LINGER = socket.SOL_SOCKET, socket.SO_LINGER
    ops = 0
    start = now()
    end = start + duration
    t = start
    # Source ports are chosen here, in sequence over PORTS, rather than by the
    # kernel (which may reuse a port within seconds): a 5-tuple comes back only
    # after len(PORTS) connections, so conntrack state of the previous
    # connection on it (closed entries linger 10 s in cilia's CT) cannot let a
    # new connection's first packet skip the policy unless rate > ~5000/s.
    ports = range(PORT_LO, PORT_HI)
    nports = len(ports)
    i = 0
    while t < end:
        for _ in range(100):  # bounded: skip ports that are in use
            src = ("", ports[i % nports])
            i += 1
            try:
                s = create(addr, IO_TIMEOUT, src)
                break
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
        else:
            raise OSError("no free source port")
        s.setsockopt(TCP, NODELAY, 1)
        s.setsockopt(SOL, LINGER, LINGER0)
        s.sendall(REQ)
        got = s.recv_into(buf, MSG)
        if got < MSG:
            recv_exact_tail(s, view, got)
        s.close()
        ops += 1
        t = now()
    return ops / (t - start)


def recv_exact_tail(s, view, got):
    while got < MSG:
        n = s.recv_into(view[got:], MSG - got)
        if not n:
            raise ConnectionError("peer closed")
        got += n


def rr(ip, port, duration):
    src = ("", PORT_HI) if os.environ.get("RR_PORTS") else None
    s = socket.create_connection((ip, port), IO_TIMEOUT, src)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(MSG)
    view = memoryview(buf)
    send, recv_into, now = s.send, s.recv_into, time.monotonic
    ops = 0
    start = now()
    end = start + duration
    t = start
    while t < end:
        # Check the clock every 64 operations only.
        for _ in range(64):
            send(REQ)
            got = recv_into(buf, MSG)
            if got < MSG:
                recv_exact_tail(s, view, got)
        ops += 64
        t = now()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
    s.close()
    return ops / (t - start)


def main(argv):
    if len(argv) >= 2 and argv[0] == "serve":
        serve(int(argv[1]), argv[2] if len(argv) > 2 else "0.0.0.0",
              float(argv[3]) if len(argv) > 3 else 900.0)
        return 0
    if len(argv) in (3, 4) and argv[0] in ("conn", "rr"):
        duration = min(float(argv[3]) if len(argv) > 3 else 5.0, 60.0)
        fn = conn if argv[0] == "conn" else rr
        print("%.0f" % fn(argv[1], int(argv[2]), duration))
        return 0
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
