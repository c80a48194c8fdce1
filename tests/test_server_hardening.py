"""The device server: a client cannot lengthen the server's session limit, and silent connections
do not delay other clients (each handshake has its own thread and deadline)."""

from __future__ import annotations

import math
import socket
import time

import pytest

from actsparse.deploy.server import session_timeout_for


@pytest.mark.parametrize("server, client, expected", [
    (2.0, 1e9, 2.0), (2.0, math.nan, 2.0), (2.0, math.inf, 2.0), (2.0, -1.0, 2.0), (2.0, 0.0, 2.0),
    (10.0, 3.0, 3.0), (None, 5.0, 5.0), (None, None, None), (4.0, None, 4.0),
])
def test_a_client_may_only_shorten_the_session_limit(server, client, expected):
    assert session_timeout_for(server, client) == expected


def test_silent_connections_do_not_delay_a_real_client():
    pytest.importorskip("tvm_ffi")
    from actsparse.deploy.process import start_local_rpc_server
    from actsparse.deploy.rpc import connect

    with start_local_rpc_server(key="k") as server:
        silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]
        try:
            time.sleep(0.2)
            start = time.perf_counter()
            board = connect("127.0.0.1", server.port, key="k", timeout=5)
            try:
                assert board.info()["machine"]
            finally:
                board.close()
            assert time.perf_counter() - start < 1.0
        finally:
            for conn in silent:
                conn.close()
