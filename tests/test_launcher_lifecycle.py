"""Lifecycle of launched servers, with fake servers in place of vLLM: health wait, log-tail quoting
when a server dies at start, port in use, and no survivors on normal exit, error, SIGTERM, Ctrl-C,
or children that ignore SIGTERM. Only processes these tests start are ever signalled."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.ports import free_port_block
from servers.launcher import LayoutError, ProcessSpec, ServerGroup, ServerStartError
from servers.launcher.lifecycle import _alive, descendants, group_members

REPO = Path(__file__).resolve().parents[1]

FAKE_SERVER = textwrap.dedent(r'''
    """A stand-in for vLLM: serves /health on --port; options make it misbehave."""
    import argparse, http.server, os, signal, subprocess, sys, time

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--ignore-term", action="store_true")
    ap.add_argument("--die-at-start", action="store_true")
    ap.add_argument("--never-healthy", action="store_true")
    ap.add_argument("--delay", type=float, default=0.2)
    ap.add_argument("--grandchild", action="store_true")
    ap.add_argument("--escape", action="store_true", help="a grandchild in its own session")
    args, _unknown = ap.parse_known_args()

    print(f"fake server pid {os.getpid()} starting on port {args.port}", flush=True)
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.die_at_start:
        for i in range(40):
            print(f"loading weights shard {i}", flush=True)
        print("Traceback (most recent call last):", flush=True)
        print("ValueError: no model weights found in /models/missing", flush=True)
        sys.exit(3)
    sleeper = ("import signal, time\n"
               + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if args.ignore_term else "")
               + "time.sleep(600)\n")
    kids = []
    if args.grandchild:
        kids.append(subprocess.Popen([sys.executable, "-c", sleeper]))
    if args.escape:
        kids.append(subprocess.Popen([sys.executable, "-c", sleeper], start_new_session=True))
    print("children " + " ".join(str(k.pid) for k in kids), flush=True)
    time.sleep(args.delay)
    if args.never_healthy:
        time.sleep(600)

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()
        def log_message(self, *a):
            pass

    http.server.HTTPServer((args.host, args.port), H).serve_forever()
''')


@pytest.fixture
def fake(tmp_path):
    path = tmp_path / "fake_server.py"
    path.write_text(FAKE_SERVER)
    return str(path)


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def spec(fake: str, tmp_path: Path, name: str, port: int, *flags: str) -> ProcessSpec:
    return ProcessSpec(name=name, argv=[sys.executable, fake, "--port", str(port), *flags],
                       port=port, log_path=str(tmp_path / "logs" / f"{name}.log"),
                       env={"PYTHONUNBUFFERED": "1"})


def assert_all_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    survivors = [p for p in pids if _alive(p)]
    assert not survivors, f"processes left running: {survivors}"


def test_start_health_and_clean_stop(fake, tmp_path):
    p1, p2 = free_ports(2)
    specs = [spec(fake, tmp_path, "a-0", p1, "--grandchild"),
             spec(fake, tmp_path, "a-1", p2, "--grandchild")]
    with ServerGroup(specs, health_timeout=20, stop_timeout=5) as group:
        pids = group.all_pids()
        assert len(pids) == 4  # two servers, one grandchild each
        for srv in group.servers:
            assert srv.healthy()
            assert os.getpgid(srv.pid) == srv.pid  # its own process group
            assert os.getsid(srv.pid) == srv.pid   # and session: Ctrl-C does not reach it
        report = group.stop()
    assert_all_gone(pids)
    assert all("stopped by SIGTERM" in r for r in report)
    assert group.stop() == []  # idempotent
    assert "starting on port" in (tmp_path / "logs" / "a-0.log").read_text()


def test_children_that_ignore_sigterm_get_sigkill(fake, tmp_path):
    (p1,) = free_ports(1)
    group = ServerGroup([spec(fake, tmp_path, "stubborn-0", p1, "--ignore-term", "--grandchild",
                              "--escape")], health_timeout=20, stop_timeout=1.0)
    with group:
        pids = group.all_pids()
        leader = group.servers[0].pid
        assert len(pids) == 3
        escaped = [p for p in pids if os.getpgid(p) != leader]
        assert len(escaped) == 1  # the grandchild that left the process group
        t0 = time.monotonic()
    took = time.monotonic() - t0
    assert_all_gone(pids)
    assert 0.9 <= took < 8, took
    assert group_members(leader) == []


def test_dies_at_start_quotes_the_log_tail_and_stops_the_others(fake, tmp_path):
    p1, p2 = free_ports(2)
    ok = spec(fake, tmp_path, "ok-0", p1, "--grandchild")
    bad = spec(fake, tmp_path, "bad-0", p2, "--die-at-start")
    group = ServerGroup([ok, bad], health_timeout=20, stop_timeout=2)
    with pytest.raises(ServerStartError) as info:
        with group:
            pytest.fail("should not get here")
    msg = str(info.value)
    first = msg.splitlines()[0]
    assert first.startswith("bad-0 exited with code 3 during start-up")
    assert "ValueError: no model weights found in /models/missing" in first
    assert f"last lines of {bad.log_path}:" in msg
    assert "  | loading weights shard 39" in msg
    assert "shard 5\n" not in msg  # only the tail (30 lines), not the whole log
    assert info.value.log_path == bad.log_path
    assert_all_gone(group.all_pids() + [s.pid for s in group.servers if s.pid])


def wait_for_log_line(path: Path, needle: str, timeout: float = 30.0) -> None:
    """Until `needle` is in the file at `path` (a slow machine may take a while to get a fresh
    Python to its first print); fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and needle in path.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"{needle!r} not in {path} after {timeout} s"
        time.sleep(0.05)


def test_health_timeout(fake, tmp_path):
    (p1,) = free_ports(1)
    slow = spec(fake, tmp_path, "slow-0", p1, "--never-healthy", "--grandchild")

    def progress(msg: str) -> None:
        # The log tail quoted at the timeout should show the server's own output: on a loaded
        # machine a fresh Python can need more than the 1.5 s to print it, so start the health
        # wait (its clock runs from the start) only once the server has logged its children.
        if msg.startswith("started slow-0"):
            wait_for_log_line(Path(slow.log_path), "children ")

    group = ServerGroup([slow], health_timeout=1.5, stop_timeout=2, on_progress=progress)
    with pytest.raises(ServerStartError, match=r"slow-0 did not answer /health on port \d+ "
                                               r"within 1.5 s") as info:
        with group:
            pass
    assert "children " in str(info.value)  # the log tail
    assert_all_gone([group.servers[0].pid] + list(group.servers[0].tracked))


def test_port_in_use_starts_nothing(fake, tmp_path):
    p1, p2 = free_ports(2)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", p2))
        holder.listen()
        group = ServerGroup([spec(fake, tmp_path, "a-0", p1), spec(fake, tmp_path, "a-1", p2)],
                            health_timeout=10)
        with pytest.raises(LayoutError, match=f"port {p2} on 127.0.0.1 \\(for a-1\\) is in use"):
            with group:
                pass
    assert all(s.pid is None for s in group.servers)


def test_cannot_exec(tmp_path):
    (p1,) = free_ports(1)
    s = ProcessSpec(name="x-0", argv=["/nonexistent/python"], port=p1,
                    log_path=str(tmp_path / "x.log"))
    with pytest.raises(ServerStartError, match="x-0: cannot start /nonexistent/python"):
        with ServerGroup([s]):
            pass


def test_server_dying_while_serving_is_reported(fake, tmp_path):
    from servers.launcher import ServerDiedError

    (p1,) = free_ports(1)
    with ServerGroup([spec(fake, tmp_path, "d-0", p1)], stop_timeout=2) as group:
        os.kill(group.servers[0].pid, signal.SIGKILL)
        group.servers[0].popen.wait(5)
        with pytest.raises(ServerDiedError, match=r"d-0 \(pid \d+\) exited with code -9"):
            group.check_alive()


# -- the launcher process itself receiving signals ------------------------------------------------

LAUNCHER = textwrap.dedent(r'''
    import json, sys, time
    sys.path.insert(0, {repo!r})
    from servers.launcher import ProcessSpec, ServerGroup
    fake, logdir, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    ports = [int(p) for p in sys.argv[4:]]
    specs = [ProcessSpec(name=f"s-{{k}}", argv=[sys.executable, fake, "--port", str(p),
                         "--ignore-term", "--grandchild"], port=p,
                         log_path=f"{{logdir}}/s-{{k}}.log") for k, p in enumerate(ports)]
    with ServerGroup(specs, health_timeout=20, stop_timeout=1) as group:
        print(json.dumps(group.all_pids()), flush=True)
        if mode == "error":
            raise RuntimeError("boom in the load stage")
        if mode == "exit":
            sys.exit(0)
        group.wait(poll_interval=0.1)
''')


def start_launcher(fake: str, tmp_path: Path, mode: str):
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER.format(repo=str(REPO)))
    ports = free_ports(2)
    proc = subprocess.Popen([sys.executable, str(script), fake, str(tmp_path), mode,
                             *map(str, ports)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        pytest.fail(f"launcher failed: {proc.stderr.read()}")
    return proc, json.loads(line)


@pytest.mark.parametrize("mode,sig,code", [
    ("wait", signal.SIGTERM, 128 + signal.SIGTERM),
    ("wait", signal.SIGHUP, 128 + signal.SIGHUP),
    ("wait", signal.SIGINT, -signal.SIGINT),  # KeyboardInterrupt: Python re-raises SIGINT
    ("error", None, 1),
    ("exit", None, 0),
])
def test_launcher_signals_and_errors_leave_no_orphans(fake, tmp_path, mode, sig, code):
    proc, pids = start_launcher(fake, tmp_path, mode)
    try:
        assert len(pids) == 4
        if sig is not None:
            proc.send_signal(sig)
        rc = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert rc == code, proc.stderr.read()
    assert_all_gone(pids)


def test_launcher_killed_with_sigkill_takes_its_servers_down(fake, tmp_path):
    """PR_SET_PDEATHSIG: a launcher that cannot clean up (SIGKILL) still stops its servers."""
    script = tmp_path / "launcher9.py"
    script.write_text(textwrap.dedent(f'''
        import json, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from servers.launcher import ProcessSpec, ServerGroup
        port = int(sys.argv[2])
        g = ServerGroup([ProcessSpec(name="s-0", argv=[sys.executable, sys.argv[1], "--port",
                         str(port)], port=port, log_path=sys.argv[3])], health_timeout=20)
        g.__enter__()
        print(json.dumps([s.pid for s in g.servers]), flush=True)
        time.sleep(600)
    '''))
    (port,) = free_ports(1)
    proc = subprocess.Popen([sys.executable, str(script), fake, str(port),
                             str(tmp_path / "s.log")], stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(proc.stdout.readline())
        assert all(_alive(p) for p in pids)
    finally:
        proc.kill()
        proc.wait(5)
    assert_all_gone(pids)


# -- harness serve end to end, with a fake vLLM ----------------------------------------------------


def fake_vllm_python(tmp_path: Path, fake: str) -> str:
    """An executable that answers like a Python with vLLM: `-c CODE` succeeds, and
    `-m vllm.entrypoints.openai.api_server ARGS` runs the fake server with ARGS."""
    exe = tmp_path / "fake-python"
    exe.write_text(textwrap.dedent(f'''\
        #!/bin/sh
        if [ "$1" = "-c" ]; then exit 0; fi
        if [ "$1" = "-m" ]; then shift 2; exec {sys.executable} {fake} --grandchild "$@"; fi
        exit 9
    '''))
    exe.chmod(0o755)
    return str(exe)


def test_harness_serve_writes_endpoints_and_stops_on_sigterm(fake, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 4}))
    layout = tmp_path / "two.yaml"
    layout.write_text(textwrap.dedent(f"""\
        servers:
          - role: cpu
            model: {model}
            device: cpu
            precision: fp32
            replicas: 2
    """))
    port = free_port_block(2)   # the layout's two replicas take port and port + 1
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "serve", "--layout", str(layout), "--out", str(out),
         "--base-port", str(port), "--vllm-python", fake_vllm_python(tmp_path, fake),
         "--health-timeout", "20", "--stop-timeout", "2"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # serve's own bound is --health-timeout 20 per server after start-up: wait longer than
        # that, so a slow start fails with serve's message rather than a missing file here
        deadline = time.monotonic() + 90
        while not (out / "endpoints.json").exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "harness serve wrote no endpoints.json in 90 s"
            time.sleep(0.1)
        doc = json.loads((out / "endpoints.json").read_text())
        from servers.launcher import read_endpoints

        eps = read_endpoints(str(out / "endpoints.json"))
        assert [e.url for e in eps.endpoints] == [f"http://127.0.0.1:{port}",
                                                  f"http://127.0.0.1:{port + 1}"]
        assert list(eps.by_model()) == ["model"]
        assert doc["endpoints"][0]["role"] == "cpu" and doc["endpoints"][0]["gpus"] == []
        pids = [e.pid for e in eps.endpoints]
        pids += [d for p in pids for d in descendants(p)]
        assert len(pids) == 4
        assert all((out / "logs" / f"cpu-{k}.log").exists() for k in range(2))
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert rc == 128 + signal.SIGTERM, proc.stderr.read()
    assert_all_gone(pids)


def test_harness_serve_start_failure_exit_1_with_log_tail(fake, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    exe = tmp_path / "dying-python"
    exe.write_text(f'#!/bin/sh\nif [ "$1" = "-c" ]; then exit 0; fi\nshift 2\n'
                   f'exec {sys.executable} {fake} --die-at-start "$@"\n')
    exe.chmod(0o755)
    (port,) = free_ports(1)
    r = subprocess.run(
        [sys.executable, "-m", "harness.cli", "serve", "--layout", "cpu", "--model", str(model),
         "--out", str(tmp_path / "out"), "--base-port", str(port), "--vllm-python", str(exe)],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "harness serve: error: cpu-0 exited with code 3 during start-up: ValueError" in r.stderr
    assert "  | ValueError: no model weights found" in r.stderr
    assert "every server was stopped" in r.stderr
