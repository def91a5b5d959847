"""Local ports."""

import socket


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's pick; the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
