"""Answering connections over the server's cap with 503, all of them, with one thread.

    rejecter = Rejecter(lambda head: raw_error_response(503, "busy; retry later", head))
    rejecter.reject(sock)    # from the accept loop: returns at once; the socket is answered and closed later
    rejecter.close()

Why one thread and a selector. A refused connection must still get an HTTP answer (a client that sees a
closed connection retries blindly or reports a network error), but a burst of hundreds must not cost
hundreds of threads. Each refused socket goes through three states, all non-blocking:

1. **Read the request line** (at most ``head_bytes``, at most ``wait_s``): its path picks the error's
   shape (OpenAI's under ``/v1/``). A client that sends nothing is answered at the deadline.
2. **Answer**: the response (a few hundred bytes) goes into the empty socket buffer in one ``send``, then
   ``shutdown(SHUT_WR)`` tells the client that nothing more comes.
3. **Drain** until the client closes (end-of-file) or ``drain_s`` passes, then close. Closing a socket
   with unread request bytes makes the kernel send a reset, which can destroy the answer on its way; reading
   them first avoids that.

At most ``max_held`` sockets are held; past that a socket is answered at once and closed (the answer is
still sent, only the drain is skipped). Memory and file descriptors are therefore bounded whatever arrives.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_HELD = 256  # refused sockets held at once (reading or draining)
HEAD_BYTES = 8192  # most bytes of a request read to find its request line


@dataclass
class _Held:
    sock: socket.socket
    deadline: float  # monotonic time when the current state ends
    head: bytes = b""
    answered: bool = False


class Rejecter:
    """Answers refused connections with ``answer(request_head) -> bytes`` (module docstring) on one thread."""

    def __init__(
        self,
        answer: Callable[[bytes], bytes],
        *,
        wait_s: float = 1.0,
        drain_s: float = 1.0,
        max_held: int = MAX_HELD,
        head_bytes: int = HEAD_BYTES,
    ):
        self.answer = answer
        self.wait_s, self.drain_s = wait_s, drain_s
        self.max_held, self.head_bytes = max_held, head_bytes
        self.answered = 0  # responses sent (statistics and tests)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._incoming: list[socket.socket] = []
        self._held: dict[socket.socket, _Held] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="scratchlm-rejecter", daemon=True)
        self._thread.start()

    def reject(self, sock: socket.socket) -> None:
        """Hand over a connection to refuse (never blocks). After :meth:`close` it is answered and closed here."""
        with self._lock:
            if not self._closed:
                self._incoming.append(sock)
                with contextlib.suppress(OSError):  # full: the thread is awake already
                    self._wake_w.send(b"\0")
                return
        self._answer_now(sock, b"")

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread; every socket still held is answered (if not yet) and closed."""
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        self._thread.join(timeout)

    # ------------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    incoming, self._incoming = self._incoming, []
                    closed = self._closed
                for sock in incoming:
                    self._hold(sock)
                if closed:
                    return
                now = time.monotonic()
                for held in [h for h in self._held.values() if h.deadline <= now]:
                    self._expire(held)
                timeout = min((h.deadline for h in self._held.values()), default=now + 1.0) - now
                for key, _ in self._selector.select(max(0.0, timeout)):
                    if key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                    elif key.fileobj in self._held:
                        self._readable(self._held[key.fileobj])
        finally:
            for held in list(self._held.values()):
                if not held.answered:
                    self._send(held)
                self._drop(held)
            with self._lock:
                incoming, self._incoming = self._incoming, []
            for sock in incoming:
                self._answer_now(sock, b"")
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _hold(self, sock: socket.socket) -> None:
        if len(self._held) >= self.max_held:
            self._answer_now(sock, b"")
            return
        sock.setblocking(False)
        self._held[sock] = _Held(sock, time.monotonic() + self.wait_s)
        self._selector.register(sock, selectors.EVENT_READ)

    def _readable(self, held: _Held) -> None:
        try:
            data = held.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            self._drop(held)
            return
        if not data:  # the client closed its side
            if not held.answered:
                self._send(held)
            self._drop(held)
            return
        if not held.answered:
            held.head = (held.head + data)[: self.head_bytes]
            if b"\n" in held.head or len(held.head) >= self.head_bytes:
                self._send(held)

    def _expire(self, held: _Held) -> None:
        if held.answered:  # drained long enough
            self._drop(held)
        else:  # no request line in time: answer with what came
            self._send(held)

    def _send(self, held: _Held) -> None:
        held.answered, held.deadline = True, time.monotonic() + self.drain_s
        try:
            held.sock.send(self.answer(held.head))
            self.answered += 1  # before the shutdown: a client that has read to end-of-file sees the count
            held.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(held)

    def _drop(self, held: _Held) -> None:
        if self._held.pop(held.sock, None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(held.sock)
        held.sock.close()

    def _answer_now(self, sock: socket.socket, head: bytes) -> None:
        """Answer and close without draining (over ``max_held``, or after :meth:`close`)."""
        try:
            sock.setblocking(False)
            sock.send(self.answer(head))
            self.answered += 1
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            sock.close()
