"""Starting `verdict serve` for the bench scripts (bench/load, bench/prompt-cache, bench/n-choices): find the
binary, start it on a free loopback port, wait until /ready answers. Standard library only."""

import http.client
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse


def find_binary(binary, who):
    """`binary`, else target/release/verdict, else target/debug/verdict (under $CARGO_TARGET_DIR
    when set); exits with a message naming `who` when there is none."""
    if binary:
        return binary
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target"))
    for profile in ("release", "debug"):
        b = os.path.join(target, profile, "verdict")
        if os.path.exists(b):
            return b
    sys.exit(f"{who}: no verdict binary; cargo build --release first, or pass --binary")


def get(url, path):
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    c.request("GET", path)
    r = c.getresponse()
    return r.status, r.read()


def start(binary, serve_args, who, ready_timeout=300, env=None):
    """`binary serve --port 0 --host 127.0.0.1 SERVE_ARGS...` (in `env`, else this process's
    environment); returns (process, url) once /ready answers 200."""
    cmd = [binary, "serve", "--port", "0", "--host", "127.0.0.1"] + list(serve_args)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)
    for line in proc.stdout:
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            url = m.group(1)
            break
    else:
        sys.exit(f"{who}: the server exited before listening")
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    t0 = time.time()
    while time.time() - t0 < ready_timeout:
        try:
            status, _ = get(url, "/ready")
            if status == 200:
                return proc, url
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"{who}: the server was not ready after {ready_timeout} s")
