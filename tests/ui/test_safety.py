"""Who the dashboard lets in and what it serves: the token beyond this machine, RUNS_DIR only, --read-only,
and the install line when the extra is missing."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

import pytest
from conftest import Served
from typer.testing import CliRunner

from sapo_lite.cli import app


def status_of(url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    sent = {"content-type": "application/json"} if body is not None else {}
    request = urllib.request.Request(url, data=data, headers={**sent, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_without_the_ui_extra_the_command_names_the_install_line(monkeypatch, tmp_path):
    monkeypatch.delitem(sys.modules, "sapo_lite.ui.server", raising=False)
    monkeypatch.setitem(sys.modules, "starlette.applications", None)  # as if starlette were not installed
    result = CliRunner().invoke(app, ["ui", str(tmp_path)])
    assert result.exit_code == 1
    assert 'pip install "sapo-lite[ui]"' in result.output
    assert "Traceback" not in result.output


def test_a_non_local_host_gets_a_printed_token_and_serves_nothing_without_it(monkeypatch, tmp_path):
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(kwargs))
    result = CliRunner().invoke(app, ["ui", str(tmp_path), "--host", "0.0.0.0", "--port", "8999"])
    assert result.exit_code == 0, result.output
    assert served == {"host": "0.0.0.0", "port": 8999, "log_level": "warning"}
    url = result.output.split("http://", 1)[1].split()[0]
    assert url.startswith("0.0.0.0:8999/?token=") and len(url.split("token=")[1]) >= 20


def test_a_port_in_use_is_one_line_naming_another_port(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["ui", str(tmp_path), "--port", str(port)])
    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.output and f"--port {port + 1}" in result.output


@pytest.mark.slow
def test_token_less_requests_on_a_non_local_host_are_refused(browser, runs_dir, shots):
    token = "a-token-given-on-the-command-line"
    served = Served(runs_dir, host="127.0.0.2", token=token)  # all of 127/8 is this machine, yet not "local"
    try:
        for path in ("/", "/api/runs", "/static/runs.js", "/api/metrics?run=done"):
            code, body = status_of(served.url + path)
            assert code == 403 and "needs its token" in body, path
        assert status_of(served.url + "/api/runs", headers={"X-Sapo-Token": "wrong" * 5})[0] == 403
        assert status_of(served.url + "/api/runs", headers={"X-Sapo-Token": token})[0] == 200
        browser.get(served.url + "/")
        assert "needs its token" in browser.find_element("tag name", "body").text
        browser.get(f"{served.url}/?token={token}")  # the page keeps it in a cookie for its own requests
        browser.implicitly_wait(30)
        assert browser.find_element("css selector", "#runs tr[data-run=done] .state").text == "finished"
        browser.implicitly_wait(0)
    finally:
        served.close()


def test_paths_outside_runs_dir_are_refused(dashboard, runs_dir, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (runs_dir / "link-out").symlink_to(outside, target_is_directory=True)
    try:
        for name in ("../done", "..", "/etc", str(runs_dir / "done"), "done/../../x", "link-out"):
            for path in ("/api/metrics", "/api/pairs"):
                code, body = status_of(f"{dashboard.url}{path}?run={urllib.request.quote(name)}")
                assert code == 403 and "outside RUNS_DIR" in json.loads(body)["error"], (path, name)
        code, body = status_of(f"{dashboard.url}/api/chat", {"target": "../../etc", "prompt": "hi"})
        assert code == 403
        assert status_of(dashboard.url + "/static/../../pyproject.toml")[0] == 404
        assert status_of(f"{dashboard.url}/api/metrics?run=done")[0] == 200
        assert status_of(dashboard.url + "/", headers={"Host": "attacker.example"})[0] == 403  # DNS rebinding
    finally:
        (runs_dir / "link-out").unlink()


def test_another_sites_page_cannot_stop_or_launch_runs(dashboard):
    """A page elsewhere can make the browser send a form or a text/plain POST here, and name itself as Origin."""
    for headers in ({"Origin": "http://attacker.example"}, {"content-type": "text/plain"}):
        for path in ("/api/stop", "/api/launch"):
            code, body = status_of(dashboard.url + path, {"run": "done", "name": "x"}, headers)
            assert code == 403 and "refused" in body, (path, headers)
    code, body = status_of(dashboard.url + "/api/stop", {"run": "done"}, {"Origin": dashboard.url})
    assert code == 409 and "not training" in body  # the dashboard's own page gets through to the check


def test_read_only_turns_launch_stop_resume_and_export_off(dashboard):
    dashboard.settings.read_only = True
    try:
        assert status_of(dashboard.url + "/launch")[0] == 403
        for path in ("/api/launch", "/api/stop", "/api/resume", "/api/export"):
            code, body = status_of(dashboard.url + path, {"run": "done", "name": "x"})
            assert code == 403 and "read-only" in body, path
        assert status_of(dashboard.url + "/")[0] == 200  # watching still works
    finally:
        dashboard.settings.read_only = False
