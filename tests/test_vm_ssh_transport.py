"""SSHTransport against a real SSH server (paramiko's server side, in a thread): exit status, stdout, stderr,
and a refused login as a one-line error. (Guests with their own sshd use the same class through hostfwd.)"""
from __future__ import annotations

import socket
import subprocess
import threading

import paramiko
import pytest

from vm.errors import VmError
from vm.transport import SSHTransport


class ExecServer(paramiko.ServerInterface):
    def check_auth_password(self, username, password):
        ok = (username, password) == ("lab", "secret")
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

    def get_allowed_auths(self, username):
        return "password"

    def check_channel_request(self, kind, chanid):
        return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel, command):
        def run():
            proc = subprocess.run(["/bin/sh", "-c", command.decode()], capture_output=True)
            channel.sendall(proc.stdout)
            channel.sendall_stderr(proc.stderr)
            channel.send_exit_status(proc.returncode)
            channel.close()
        threading.Thread(target=run, daemon=True).start()
        return True


@pytest.fixture
def sshd():
    key = paramiko.RSAKey.generate(2048)
    listener = socket.create_server(("127.0.0.1", 0))
    transports = []

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            transport = paramiko.Transport(conn)
            transport.add_server_key(key)
            transport.start_server(server=ExecServer())
            transports.append(transport)

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()
    for transport in transports:
        transport.close()


def test_ssh_transport_runs_commands(sshd):
    ssh = SSHTransport("127.0.0.1", sshd, username="lab", password="secret")
    try:
        ssh.connect(timeout=20)
        result = ssh.run("echo out; echo err >&2; exit 5", timeout=20)
        assert (result.exit_code, result.stdout, result.stderr) == (5, "out\n", "err\n")
        assert ssh.run("true", timeout=20).exit_code == 0
    finally:
        ssh.close()


def test_ssh_transport_refused_login_is_one_line(sshd):
    ssh = SSHTransport("127.0.0.1", sshd, username="lab", password="wrong", connect_timeout=5)
    with pytest.raises(VmError, match=rf"ssh lab@127.0.0.1:{sshd}: no connection within 3s") as info:
        ssh.connect(timeout=3)
    assert "\n" not in str(info.value)
