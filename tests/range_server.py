"""Test scaffolding: serve a folder over HTTP on 127.0.0.1 with Range requests honoured.

Python's own handler answers whole files only. This one answers ``Range: bytes=a-b`` with 206
and counts the bytes of file content it sends; ``GET /__served__`` returns that count and
resets it, and paths under ``/forbidden/`` answer 403. Run as ``python range_server.py
FOLDER``: it prints its port on the first line of stdout, then serves until terminated. It
runs in its own process because GDAL may hold the GIL while it waits for an answer.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import sys
import threading
from typing import Any

_lock = threading.Lock()
_served = 0


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Files with Range support; the byte counter; 403 under /forbidden/."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Quiet."""

    def send_head(self) -> Any:
        """A 206 partial answer for a Range request, else the base class's answer."""
        global _served
        self._remaining: int | None = None
        if self.path == '/__served__':
            with _lock:
                body, _served = str(_served).encode(), 0
            self.send_response(200)
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return None
        if self.path.startswith('/forbidden/'):
            self.send_error(403)
            return None
        path = self.translate_path(self.path)
        match = re.fullmatch(r'bytes=(\d+)-(\d*)', self.headers.get('Range', '').strip())
        if match is None or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        start = int(match.group(1))
        end = min(int(match.group(2) or size - 1), size - 1)
        source = open(path, 'rb')  # noqa: SIM115 (closed by the base class)
        source.seek(start)
        self.send_response(206)
        self.send_header('Content-Type', 'application/octet-stream')
        self.send_header('Content-Range', f'bytes {start}-{end}/{size}')
        self.send_header('Content-Length', str(end - start + 1))
        self.send_header('Accept-Ranges', 'bytes')
        self.end_headers()
        self._remaining = end - start + 1
        return source

    def copyfile(self, source: Any, outputfile: Any) -> None:
        """Send the requested range only (the whole file without one), counting it."""
        global _served
        remaining = self._remaining
        data = source.read() if remaining is None else source.read(remaining)
        with _lock:
            _served += len(data)
        try:
            outputfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading
            pass


def main() -> None:
    """Serve sys.argv[1] on 127.0.0.1, printing the port."""
    handler = functools.partial(RangeHandler, directory=sys.argv[1])
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == '__main__':
    main()
