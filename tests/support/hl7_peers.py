"""HL7 v2 peers for tests: an EMR that sends orders over MLLP, and an EMR that receives results and
acknowledges them. Messages are parsed and acknowledgements built with python-hl7 (``hl7``), a library
the archive itself does not use, so the archive's HL7 is judged by someone else's parser."""

from __future__ import annotations

import socket
import socketserver
import threading

import hl7

START, END = b"\x0b", b"\x1c\x0d"


def send_mllp(port: int, message: str | bytes, timeout: float = 30) -> hl7.Message:
    """Send one framed message, return the parsed acknowledgement."""
    data = message.encode("utf-8") if isinstance(message, str) else message
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(START + data + END)
        return hl7.parse(read_frame(sock).decode("utf-8"))


def read_frame(sock: socket.socket) -> bytes:
    buffer = b""
    while END not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before the end of the frame ({len(buffer)} bytes)")
        buffer += chunk
    return buffer[buffer.index(START) + 1:buffer.index(END)]


class EmrReceiver:
    """An MLLP server that records every message and answers ``ack_code`` (AA by default)."""

    def __init__(self, ack_code: str = "AA", port: int = 0) -> None:
        self.ack_code = ack_code
        self.messages: list[hl7.Message] = []
        self.raw: list[str] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(30)
                try:
                    while True:
                        text = read_frame(self.request).decode("utf-8")
                        message = hl7.parse(text)
                        with receiver._lock:
                            receiver.raw.append(text)
                            receiver.messages.append(message)
                        ack = message.create_ack(receiver.ack_code, message_id=f"ACK{len(receiver.raw)}")
                        self.request.sendall(START + str(ack).encode("utf-8") + END)
                except (ConnectionError, TimeoutError, OSError):
                    return

        socketserver.ThreadingTCPServer.allow_reuse_address = True  # restarted on the same port in fault tests
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self) -> EmrReceiver:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def of_type(self, message_type: str) -> list[hl7.Message]:
        with self._lock:
            return [m for m in self.messages if str(m.segment("MSH")[9]).startswith(message_type)]
