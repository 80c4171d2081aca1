"""A free TCP port for a multi-process test's rendezvous, so that two test runs at once do not collide on a
fixed one (the kernel picks it; it stays free for the moment between closing and the launcher binding it)."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
