"""`lora-scripts gui` as a user starts it: a real uvicorn server on 127.0.0.1, printing its address."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request

from tests.helpers.ports import free_port


def _get(url: str, host: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_the_gui_command_serves_the_app_on_loopback_only(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lora_scripts.cli",
            "gui",
            "--port",
            str(port),
            "--no-browser",
            "--root",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        first_line = process.stdout.readline()
        assert first_line.strip() == f"lora-scripts gui: http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 60
        while True:
            try:
                status, page = _get(f"http://127.0.0.1:{port}/")
                break
            except (ConnectionError, urllib.error.URLError):
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        assert status == 200 and "lora-scripts" in page
        status, body = _get(f"http://127.0.0.1:{port}/api/roots", host="attacker.example")
        assert status == 400 and "its own address" in body
    finally:
        process.terminate()
        process.wait(timeout=30)
