"""Checkpoints given as URLs: a download whose connection stalls ends in one line instead of hanging, a slow
one that keeps sending is not cut, and the secrets a URL carries (a presigned query's signature, a password)
never reach what the tool prints or writes, while the host and the file name do."""

import datetime
import http.server
import json
import os
import socket
import threading
import time
from argparse import Namespace
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import make_split, official_layouts, run_forked, run_ranks, serve, wait_or_kill

import main_finetune
from util.checkpoint import download, opening
from util.checkpoint.download import cached_path
from util.checkpoint.load import load_checkpoint
from util.cli.errors import UserError, run_cli
from util.cli.redact import redacted, shown_url
from util.train import distributed


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
    monkeypatch.setattr(download, "STALL_TIMEOUT_S", 1.0)
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
    monkeypatch.setattr(download, "STALL_TIMEOUT_S", 2.0)
    body = _checkpoint_bytes(tmp_path)
    started = time.monotonic()
    with _served_in_pieces(body, pieces=6, pause_s=0.5, stall=False) as url:
        ckpt = load_checkpoint(url)
    assert time.monotonic() - started > 2.0  # longer in all than the limit
    assert socket.getdefaulttimeout() is None  # as before the download: other sockets of the process wait on
    assert torch.equal(ckpt["model"]["w"], torch.arange(64.0))
    assert Path(cached_path(url)).read_bytes() == body


# ---------------------------------------------------------------------------------------------
# Secrets in URLs
SECRETS = ("s3cr3t-pass", "AKIAEXAMPLE", "deadbeef0123signature", "tok-4567")
QUERY = "?X-Amz-Credential=AKIAEXAMPLE%2F20260101&X-Amz-Signature=deadbeef0123signature&token=tok-4567"


@pytest.mark.parametrize(
    "url, shown",
    [
        (
            f"https://h.example/a/w.pth{QUERY}",
            "https://h.example/a/w.pth?X-Amz-Credential=***&X-Amz-Signature=***&token=***",
        ),
        ("https://me:s3cr3t-pass@h.example:8443/w.pth", "https://me:***@h.example:8443/w.pth"),
        ("https://tok-4567@h.example/w.pth?dl=1#tok-4567", "https://***@h.example/w.pth?dl=***#***"),
        ("https://h.example/w@2.pth?tok-4567", "https://h.example/w@2.pth?***"),
        ("https://h.example:8443/w@2.pth", None),  # a port, then an @ of the path: nothing to hide
        ("http://[::1]:8000/w.pth?sig=tok-4567", "http://[::1]:8000/w.pth?sig=***"),
        # A password typed with '/', '?' or '#' unencoded (AWS secret keys hold '/'): shown whole before.
        ("https://me:s3cr3t/pass@h.example/w.pth", "https://me:***@h.example/w.pth"),
        ("https://me:s3cr3t?pass@h.example/w.pth?dl=1", "https://me:***@h.example/w.pth?dl=***"),
        ("https://me:s3cr3t#pass@h.example/w.pth", "https://me:***@h.example/w.pth"),
        ("https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth", None),  # nothing to hide
    ],
)
def test_a_url_is_shown_without_its_secrets(url, shown):
    assert shown_url(url) == (shown or url)


def test_urls_inside_a_line_are_shown_without_their_secrets():
    url = f"https://me:s3cr3t-pass@h.example/w.pth{QUERY}"
    line = f'--finetune {url}: rank 1 (checkpoint {url}); {{"finetune": "{url}"}} Namespace(finetune=\'{url}\')'
    shown = redacted(line)
    assert not any(secret in shown for secret in SECRETS), shown
    hidden = "https://me:***@h.example/w.pth?X-Amz-Credential=***&X-Amz-Signature=***&token=***"
    assert shown == line.replace(url, hidden)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """A tiny official release (vit_tiny_patch4 at 48 px, encoder only) to serve, and a truncated copy."""
    root = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    torch.save({"model": official_layouts(48)["encoder"]}, root / "release.pth")
    whole = (root / "release.pth").read_bytes()
    (root / "truncated.pth").write_bytes(whole[: len(whole) // 2])
    return root


def _finetune(tmp_path: Path, url: str, exit_code: int) -> str:
    """main_finetune.py --finetune URL for one epoch, forked and run as the command line runs it (its
    one-line error on stderr): what it printed and wrote (stdout, stderr, log.txt)."""
    out = tmp_path / "out"
    argv = ["--finetune", url, "--data_path", str(make_split(tmp_path / "data", 4, 2)), "--nb_classes", "3"]
    argv += ["--epochs", "1", "--batch_size", "4", "--output_dir", str(out), "--log_dir", str(out)]
    argv += ["--device", "cpu", "--precision", "fp32", "--num_workers", "0"]
    args = main_finetune.get_args_parser().parse_args(argv)
    pid = run_forked(tmp_path / "output", lambda: run_cli(lambda: main_finetune.main(args)))
    code = wait_or_kill(pid, time.time() + 120)
    written = (tmp_path / "output").read_text()
    assert code == exit_code, written
    return written + ((out / "log.txt").read_text() if (out / "log.txt").exists() else "")


def _without_secrets(written: str, url: str) -> None:
    assert not any(secret in written for secret in SECRETS), written
    assert url.split("?")[0].split("@")[-1] in written or "***@" in written, written  # the host and the path


@pytest.mark.parametrize("name", ["missing.pth", "truncated.pth"])
def test_a_failed_download_names_the_url_without_its_secrets(served, tmp_path, monkeypatch, name):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    with serve(served) as (address, asked):
        url = f"{address}/{name}{QUERY}"
        written = _finetune(tmp_path, url, exit_code=2)
    assert asked == [f"/{name}{QUERY}"]  # the real URL, secrets and all, was asked for
    line = written.strip().splitlines()[-1]
    assert line.startswith(f"error: checkpoint {address}/{name}?X-Amz-Credential=***&X-Amz-Signature=***&token=*** ")
    assert f"downloading {address}/{name}?X-Amz-Credential=***" in written
    _without_secrets(written, url)


def test_a_url_with_a_password_is_refused_in_one_line_without_it(served, tmp_path, monkeypatch):
    """urllib, which torch.hub downloads with, takes ``user:password@`` for part of the host name: the
    download failed on a name lookup of it ('Name or service not known'), and the line showed the password."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    with serve(served) as (address, asked):
        url = address.replace("://", "://me:s3cr3t-pass@") + f"/release.pth{QUERY}"
        written = _finetune(tmp_path, url, exit_code=2)
    assert asked == []
    host = address.removeprefix("http://")
    assert written.strip().splitlines()[-1] == (
        f"error: checkpoint http://me:***@{host}/release.pth?X-Amz-Credential=***&X-Amz-Signature=***&token=*** "
        "holds a user name or password, which torch.hub cannot send: download it yourself and give the file"
    )
    _without_secrets(written, url)


@pytest.mark.parametrize("password", ["s3cr3t/pass", "s3cr3t?pass", "s3cr3t'pass"])
def test_a_password_with_a_slash_a_question_mark_or_a_quote_is_refused_without_it(tmp_path, monkeypatch, password):
    """urllib reads ``https://me:s3cr3t/pass@host/...`` as host ``me`` at port ``s3cr3t``: the download was tried
    and failed in a line that showed the URL whole and the password again ("nonnumeric port: 's3cr3t'"). A quote
    ends a URL inside a line (a repr, JSON): the refusal showed ``me:s3cr3t'pass@``."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    url = f"https://me:{password}@h.example/w.pth"
    with pytest.raises(UserError) as refused:
        download.download(url)
    assert redacted(str(refused.value)) == (
        "checkpoint https://me:***@h.example/w.pth holds a user name or password, which torch.hub cannot send: "
        "download it yourself and give the file"
    )


def test_a_successful_download_prints_and_saves_the_url_without_its_secrets(served, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    with serve(served) as (address, asked):
        url = f"{address}/release.pth{QUERY}"
        written = _finetune(tmp_path, url, exit_code=0)
    assert asked == [f"/release.pth{QUERY}"]
    assert Path(cached_path(url)).is_file()  # the cache path hashes the real URL
    shown = f"{address}/release.pth?X-Amz-Credential=***&X-Amz-Signature=***&token=***"
    assert f"downloading {shown} to {cached_path(url)}" in written
    assert f'"finetune": "{shown}"' in written  # the flags printed at start-up
    _without_secrets(written, url)
    saved = torch.load(tmp_path / "out" / "checkpoint-0.pth", weights_only=False)["args"]
    assert saved.finetune == shown  # a shared checkpoint does not hand the credentials on


def test_knn_records_and_exported_metadata_hold_no_secrets(tmp_path):
    """knn_eval's --output records its encoders and command line, export.py a checkpoint's args (one written
    before they were left out of it): files that are shared as they are."""
    import knn_eval
    from util.interop.files import args_metadata

    url = f"https://h.example/w.pth{QUERY}"
    record = {"encoder": url, "command": f"python knn_eval.py --encoders {url} random"}
    knn_eval.append_record(str(tmp_path / "knn.jsonl"), record)
    metadata = args_metadata(Namespace(finetune=url, model="vit_tiny_patch4"))
    for written in ((tmp_path / "knn.jsonl").read_text(), metadata["args"]):
        assert "h.example/w.pth?X-Amz-Credential=***" in written, written
        assert not any(secret in written for secret in SECRETS), written


def test_a_quote_in_a_url_leaves_the_knn_record_and_the_exported_metadata_valid_json(tmp_path):
    """They were redacted as JSON text, where a URL ends at a quote: the backslash escaping it was cut off with
    the query's value, and the line did not parse."""
    import knn_eval
    from util.interop.files import args_metadata

    url = 'https://h.example/w.pth?sig=ab"cd'
    knn_eval.append_record(str(tmp_path / "knn.jsonl"), {"encoder": url, "command": f"python knn_eval.py {url}"})
    metadata = args_metadata(Namespace(finetune=url))
    for written in ((tmp_path / "knn.jsonl").read_text(), metadata["args"]):
        values = json.loads(written)
        assert values.get("encoder", values.get("finetune")) == "https://h.example/w.pth?sig=***", written
        # In running text a quote ends a URL (a repr, a JSON of the flags): only what precedes it is hidden.
        assert "ab" not in written, written


@pytest.mark.parametrize("url", ["http://[::1/w.pth", "https://h.example:99999/w.pth"])
def test_a_url_urllib_cannot_read_is_refused_in_one_line(url, tmp_path, monkeypatch):
    """An IPv6 address without its closing bracket ended in urllib's traceback; a port beyond 65535 in one
    line only once the connection failed."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    with pytest.raises(UserError) as refused:
        load_checkpoint(url)
    assert str(refused.value).startswith(f"checkpoint {url} is not a URL that can be read ("), refused.value
    assert str(refused.value).endswith("; check it")


def test_every_rank_refuses_a_url_urllib_cannot_read_at_once(tmp_path, monkeypatch):
    """In a job the downloader alone met the unreadable URL (in a traceback), and the others waited for its
    download until it had got no further for 30 minutes (3 s here)."""
    monkeypatch.setattr(distributed, "COLLECTIVE_TIMEOUT", datetime.timedelta(seconds=3))
    url = "http://[::1/w.pth"

    def rank_main() -> None:
        os.environ["TORCH_HOME"] = str(tmp_path / "cache")
        distributed.init_distributed_mode(Namespace(dist_url="env://", dist_on_itp=False, device="cpu"))
        opening.open_on_every_rank(lambda: opening.open_checkpoint(url), url, "--finetune")

    logs = run_ranks(rank_main, tmp_path / "ranks", exit_codes=(2, 2), timeout=60)
    line = f"error: checkpoint {url} is not a URL that can be read (Invalid IPv6 URL); check it\n"
    assert all(line in log for log in logs), logs
