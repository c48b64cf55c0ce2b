"""How one request ended: the code stored per request, and the class it belongs to.

Every request the drill sends ends in exactly one class.  A request is stored as a
single small integer, its *code*:

======  ==================  =====================================================
code    class               meaning
======  ==================  =====================================================
1       ``refused``         ``connect()`` failed with ECONNREFUSED
2       ``reset``           the connection was reset (ECONNRESET, EPIPE,
                            ECONNABORTED) before a complete response arrived
3       ``eof``             the server closed the connection (FIN) before a
                            complete response arrived; for a WebSocket echo,
                            also a close frame while the echo was outstanding
4       ``timeout``         no complete response within the request timeout
5       ``other_error``     anything else: a response that is not valid HTTP/1.1
                            or WebSocket, an unexpected OS error (should be 0)
10      ``success``         a WebSocket echo came back intact
100-599 by status           2xx and 3xx, and 101 on a WebSocket handshake, are
                            ``success``; a 5xx is ``5xx`` (each code is counted
                            apart, 503 among them); any other status is
                            ``other_status``
======  ==================  =====================================================

A request that was sent on a keep-alive connection is never retried elsewhere: if
that connection turns out to be closed, the request fails in its class.  Requests the
drill could not send at all (its own in-flight limit) are not requests; they are
reported apart as ``not_sent``.
"""

from __future__ import annotations

from typing import Final

REFUSED: Final = 1
RESET: Final = 2
EOF: Final = 3
TIMEOUT: Final = 4
OTHER_ERROR: Final = 5
WS_ECHO_OK: Final = 10

#: The classes in the order they are reported; ``5xx`` and ``other_status`` are
#: further split by status code.
CLASSES: Final = (
    "success",
    "refused",
    "reset",
    "eof",
    "timeout",
    "5xx",
    "other_status",
    "other_error",
)
FAILURE_CLASSES: Final = CLASSES[1:]

_TRANSPORT = {REFUSED: "refused", RESET: "reset", EOF: "eof", TIMEOUT: "timeout"}


def classify(code: int) -> str:
    """The class of a stored request code."""
    if code >= 100:
        if 200 <= code < 400 or code == 101:
            return "success"
        if 500 <= code < 600:
            return "5xx"
        return "other_status"
    if code == WS_ECHO_OK:
        return "success"
    return _TRANSPORT.get(code, "other_error")


def has_response(code: int) -> bool:
    """Whether the request got a complete response, so that its latency is meaningful."""
    return code >= 100 or code == WS_ECHO_OK
