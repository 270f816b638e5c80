"""Checkpoints given as URLs: a download whose connection stalls ends in one line instead of hanging, and a
slow one that keeps sending is not cut."""

import http.server
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import run_forked, wait_or_kill

from util.checkpoint import load
from util.checkpoint.load import cached_path, load_checkpoint
from util.cli.errors import run_cli


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)


@contextmanager
def _served_in_pieces(body: bytes, pieces: int, pause_s: float, stall: bool) -> Iterator[str]:
    """A server of ``body`` at /w.pth with its full Content-Length, in ``pieces`` pieces with ``pause_s``
    between them; ``stall``: it sends the first piece only, then holds the connection open without sending
    (a dead link, a proxy that holds it) until the block ends."""
    released = threading.Event()
    size = -(-len(body) // pieces)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for start in range(0, len(body), size):
                if start:
                    if stall:
                        released.wait(60)
                        return
                    time.sleep(pause_s)
                self.wfile.write(body[start : start + size])
                self.wfile.flush()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/w.pth"
    finally:
        released.set()
        server.shutdown()
        server.server_close()


def _checkpoint_bytes(tmp_path: Path) -> bytes:
    torch.save({"model": {"w": torch.arange(64.0)}}, tmp_path / "w.pth")
    return (tmp_path / "w.pth").read_bytes()


def test_a_download_whose_connection_stalls_ends_in_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """torch.hub's urlopen had no timeout: a server that stopped sending after the headers and a first piece
    blocked the process for ever (here: killed by the guard after 30 s, and the test fails)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(load, "STALL_TIMEOUT_S", 1.0)
    with _served_in_pieces(_checkpoint_bytes(tmp_path), pieces=4, pause_s=0, stall=True) as url:
        pid = run_forked(tmp_path / "output", lambda: run_cli(lambda: load_checkpoint(url)))
        code = wait_or_kill(pid, time.time() + 30)  # the guard: a hang fails the test, not the suite
    output = (tmp_path / "output").read_text()
    assert code == 2, output
    assert output.endswith(
        f"error: checkpoint {url} could not be downloaded: no bytes came for 1 s (the server or the connection "
        "stalled); run again, or download it yourself and give the file\n"
    ), output
    # Neither the checkpoint nor torch.hub's temporary file (NAME.HEX.partial) is left to be taken for it.
    assert [p for p in (tmp_path / "home").rglob("*") if p.is_file()] == []
    assert not Path(cached_path(url)).exists()


def test_a_slow_download_that_keeps_sending_is_not_cut(tmp_path, monkeypatch):
    """The limit bounds each wait for bytes, not the download: pauses shorter than it, adding up to more,
    end in the checkpoint. (A limit on the whole download would fail here.)"""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(load, "STALL_TIMEOUT_S", 2.0)
    body = _checkpoint_bytes(tmp_path)
    started = time.monotonic()
    with _served_in_pieces(body, pieces=6, pause_s=0.5, stall=False) as url:
        ckpt = load_checkpoint(url)
    assert time.monotonic() - started > 2.0  # longer in all than the limit
    assert torch.equal(ckpt["model"]["w"], torch.arange(64.0))
    assert Path(cached_path(url)).read_bytes() == body
