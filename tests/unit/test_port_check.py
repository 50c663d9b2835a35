"""A busy port is refused before vLLM starts: vLLM binds with SO_REUSEPORT, so a second
server would silently share requests with a stale one."""

from __future__ import annotations

import socket

import pytest

from grpo_stream.serving.server import ServerStartError, check_port_free


def test_busy_port_is_refused_and_named_then_free_port_passes():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    with pytest.raises(ServerStartError, match=rf"server.port: 127.0.0.1:{port} is already in use"):
        check_port_free("127.0.0.1", port)
    listener.close()
    check_port_free("127.0.0.1", port)
