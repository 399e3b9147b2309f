"""A real Flower federation on 127.0.0.1 for tests: a SuperLink and SuperNodes as processes.

Usage::

    with Federation(tmp_path, tls=True, auth=True) as fed:
        fed.start_link()
        fed.start_node("site-a", data_path)          # registered (auth) and started
        fed.flwr_run(app_dir, "resume=''")            # `flwr run ... --stream`, waits for it
    # every process started here is stopped on leaving the block, even when the test fails
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cllora
from cllora.flower.credentials import write_node_keys, write_tls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Federation:
    """Processes of one federation (see the module doc)."""

    def __init__(self, root: Path, tls: bool = True, auth: bool = True) -> None:
        self.root, self.tls, self.auth = root, tls, auth
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.home = root / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.certs = write_tls(root / "certs", ["127.0.0.1"]) if tls else None
        # the processes import the cllora this test imports (whatever an editable install maps)
        path = os.pathsep.join(
            [str(Path(cllora.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        )
        # Flower's commands (and the flwr-serverapp / flwr-clientapp processes they start) are
        # the ones installed beside this interpreter, also when its environment is not activated
        bin_path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": path.rstrip(os.pathsep), "PATH": bin_path}  # fmt: skip
        self._write_connection()

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc) -> None:
        for name in list(self.procs):
            self.stop(name)

    def _write_connection(self) -> None:
        security = (f'root-certificates = "{self.certs["ca"]}"' if self.certs
                    else "insecure = true")  # fmt: skip
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = '
            f'"127.0.0.1:{self.port}"\n{security}\n'
        )

    def _security(self, node: bool) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        if node:
            return ["--root-certificates", str(self.certs["ca"])]
        return ["--ssl-ca-certfile", str(self.certs["ca"]), "--ssl-certfile",
                str(self.certs["cert"]), "--ssl-keyfile", str(self.certs["key"])]  # fmt: skip

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        self.logs[name] = log
        with log.open("ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True)  # fmt: skip
        self.procs[name] = proc
        return proc

    def start_link(self) -> None:
        cmd = ["flower-superlink", *self._security(node=False), "--port", str(self.port),
               "--disable-runtime-dependency-installation"]  # fmt: skip
        if self.auth:
            cmd.append("--enable-supernode-auth")
        self._start("superlink", cmd)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"the SuperLink did not listen: {self.log_text('superlink')}")

    def keys(self, name: str, register: bool = True) -> Path:
        """A node's private key (its public key registered with the SuperLink)."""
        private, public = self.root / "keys" / name, self.root / "keys" / f"{name}.pub"
        if not private.exists():
            private, public = write_node_keys(self.root / "keys", name)
            if register:
                cmd = ["flwr", "supernode", "register", str(public), "test"]
                subprocess.run(cmd, env=self.env, check=True, capture_output=True, timeout=120)
        return private

    def start_node(self, name: str, data: Path, register: bool = True) -> subprocess.Popen:
        cmd = ["flower-supernode", *self._security(node=True), "--superlink",
               f"127.0.0.1:{self.port}", "--port", str(free_port()),
               "--node-config", f"data-path='{data}' name='{name}'"]  # fmt: skip
        if self.auth:
            cmd += ["--auth-supernode-private-key", str(self.keys(name, register))]
        return self._start(name, cmd)

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)

    def flwr_run(self, app: Path, run_config: str, timeout: float = 900) -> str:
        """``flwr run APP test --run-config ... --stream``; its output."""
        cmd = ["flwr", "run", str(app), "test", "--stream", "--run-config", run_config]
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        return done.stdout + done.stderr

    def log_text(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace") if name in self.logs else ""

    def wait_for(self, name: str, text: str, count: int, timeout: float) -> None:
        """Until ``text`` appears ``count`` times in the log of ``name``."""
        deadline = time.monotonic() + timeout
        while self.log_text(name).count(text) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: {text!r} x{count} not seen in {timeout:.0f} s")
            time.sleep(0.2)
