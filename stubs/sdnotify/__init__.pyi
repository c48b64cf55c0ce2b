import socket

class SystemdNotifier:
    debug: bool
    socket: socket.socket
    def __init__(self, debug: bool = ...) -> None: ...
    def notify(self, state: str) -> None: ...
