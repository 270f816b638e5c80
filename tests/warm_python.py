"""A ``python`` that starts in milliseconds, for the scripts that run one from ``$PYTHON`` (the
recipes): a server imports torch and the entry points once, then runs each command line in a
process forked from it, with the caller's arguments, folder, environment, stdin, stdout and
stderr, and hands back its exit status. Importing torch, timm and torchvision takes most of a
short run's time; this pays for it once.

    with warm_python(tmp_path) as python:   # a path to give as $PYTHON
        subprocess.run(["bash", "recipe.sh"], env={**os.environ, "PYTHON": str(python)})

``python -S tests/warm_python.py client SOCKET ARGS...`` is what the generated ``python`` runs
(standard library only, so it starts fast); ``serve SOCKET MODULES...`` is the server.
"""

import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRELOAD = ("main_pretrain", "main_finetune", "main_linprobe", "knn_eval")


def client(sock_path: str, argv: list[str]) -> int:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sock_path)
        request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
        socket.send_fds(s, [struct.pack("!I", len(request)) + request], [0, 1, 2])
        status = s.recv(4)
    # Nothing back: the run died of a signal before it could answer.
    return struct.unpack("!i", status)[0] if len(status) == 4 else 1


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    size = struct.unpack("!I", data[:4])[0]
    body = data[4:]
    while len(body) < size:
        body += conn.recv(size - len(body))
    return json.loads(body), fds


def _run(request: dict) -> int:
    """As ``python ARGV`` would: ``-m module`` or a script, as ``__main__``."""
    import runpy

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if "torch" in sys.modules and "OMP_NUM_THREADS" in os.environ:  # read by torch at import: apply it
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    argv = request["argv"]
    try:
        if argv[:1] == ["-m"]:
            sys.argv = [argv[1], *argv[2:]]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def serve(sock_path: str, modules: list[str]) -> None:
    import importlib
    import signal
    import traceback

    sys.path.insert(0, str(HERE.parent))
    for name in modules:
        importlib.import_module(name)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # no zombies: the callers wait for the status
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(sock_path)
        server.listen()
        print("ready", flush=True)
        while True:
            conn, _ = server.accept()
            if os.fork():
                conn.close()
                continue
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the run's own subprocesses report back
            code = 1
            try:
                request, fds = _receive(conn)
                for fd, target in zip(fds, (0, 1, 2), strict=True):
                    os.dup2(fd, target)
                code = _run(request)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                conn.sendall(struct.pack("!i", code))
                os._exit(code)


@contextmanager
def warm_python(workdir: Path, modules: tuple[str, ...] = PRELOAD) -> Iterator[Path]:
    """Start a server in ``workdir``; yields the path of an executable to use as ``python``."""
    workdir.mkdir(parents=True, exist_ok=True)
    sock = workdir / "python.sock"
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "serve", str(sock), *modules],
        stdout=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    )
    try:
        assert server.stdout.readline() == b"ready\n", "the warm python server did not start"
        python = workdir / "python"
        python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "{Path(__file__).resolve()}" client "{sock}" "$@"\n')
        python.chmod(0o755)
        yield python
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    if sys.argv[1] == "client":
        sys.exit(client(sys.argv[2], sys.argv[3:]))
    serve(sys.argv[2], sys.argv[3:])
