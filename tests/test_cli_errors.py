"""Issue 10.19: config and command-line errors are one line, never a traceback.

Every case runs the real command line (or the real server) as a subprocess.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import yaml

from proxy.auth import hash_secret
from tests.conftest import MakeProxy
from tests.faults.helpers import basic, call, eventually
from tests.support.artifacts import build_wheel
from tests.support.forms import multipart, upload_fields

ROOT = Path(__file__).resolve().parents[1]
SECRET = "ig_cli-errors-writer-secret"


def _run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _one_line_problem(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert expected in result.stderr, result.stderr


def test_impossible_date_and_non_utf8_are_key_path_problems(tmp_path: Path) -> None:
    bad_date = tmp_path / "date.yaml"
    bad_date.write_text(
        "auth:\n  tokens:\n    - name: ci\n"
        f"      sha256: {hash_secret('x')}\n      scopes: [read]\n      expires: 2027-02-30\n"
    )
    not_utf8 = tmp_path / "bytes.yaml"
    not_utf8.write_bytes(b"log:\n  level: \"\xff\xfe\"\n")
    too_deep = tmp_path / "deep.yaml"
    too_deep.write_text("[" * 100_000)
    for command in ("check-config", "serve"):
        args = [str(bad_date)] if command == "check-config" else ["--config", str(bad_date)]
        _one_line_problem(_run(command, *args), "auth.tokens[0].expires: expected a date")
    _one_line_problem(_run("check-config", str(not_utf8)), "line 2: not UTF-8 text (byte 0xff)")
    _one_line_problem(_run("check-config", str(too_deep)), "nested too deeply")


def test_valid_dates_still_load(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        "auth:\n  tokens:\n    - name: ci\n"
        f"      sha256: {hash_secret('x')}\n      scopes: [read]\n      expires: 2099-02-28\n"
    )
    assert _run("check-config", str(good)).returncode == 0


def test_sighup_with_a_broken_file_is_refused_and_the_old_config_keeps_serving(
    make_proxy: MakeProxy,
) -> None:
    proxy = make_proxy()
    proxy.config_path.write_bytes(b"upstream:\n  forward: \"\xff\"\n")
    proxy.sighup()
    assert eventually(lambda: "reload refused" in proxy.log_text())
    assert "Traceback" not in proxy.log_text()
    assert call(proxy.url + "/-/health").status == 200
    proxy.config_path.write_text("auth:\n  tokens:\n    - name: x\n      sha256: "
                                 f"{hash_secret('x')}\n      scopes: [read]\n"
                                 "      expires: 2027-02-30\n")
    proxy.sighup()
    assert eventually(lambda: proxy.log_text().count("reload refused") == 2)
    assert "Traceback" not in proxy.log_text()
    assert proxy.returncode is None


def test_serve_on_a_busy_port_is_one_line_and_non_zero(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _run("serve", "--port", str(port), timeout=60)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert errors == [f"listen: cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_token_new_prints_valid_quoted_yaml_and_refuses_the_past() -> None:
    made = _run("token", "new", "--name", "ci: nightly #1", "--scopes", "read,write",
                "--expires", "2099-01-31")
    assert made.returncode == 0, made.stderr
    entries = yaml.safe_load(made.stdout)
    assert entries == [{"name": "ci: nightly #1", "sha256": entries[0]["sha256"],
                        "scopes": ["read", "write"], "expires": "2099-01-31"}]
    secret = next(line.split()[-1] for line in made.stdout.splitlines() if "ig_" in line)
    assert hash_secret(secret) == entries[0]["sha256"]
    past = _run("token", "new", "--name", "old", "--expires", "2001-01-01")
    assert past.returncode == 2 and "in the past" in past.stderr and "ig_" not in past.stdout


def test_legacy_without_a_slash_takes_uploads(make_proxy: MakeProxy, tmp_path: Path) -> None:
    proxy = make_proxy({"auth": {"tokens": [
        {"name": "ci", "sha256": hash_secret(SECRET), "scopes": ["read", "write"]}]}})
    wheel = build_wheel(tmp_path / "dist", "legacy-pkg", "1.0")
    content = wheel.read_bytes()
    body, ctype = multipart(upload_fields("legacy-pkg", "1.0", content), (wheel.name, content))
    answer = call(proxy.url + "/legacy", "POST", body=body,
                  headers={"Content-Type": ctype, "Authorization": basic("ci", SECRET)})
    assert answer.status == 200, answer.body
    assert wheel.name.encode() in call(proxy.url + "/simple/legacy-pkg/").body


def test_a_reload_that_changes_the_indexes_is_refused_other_changes_apply(
    make_proxy: MakeProxy,
) -> None:
    proxy = make_proxy({"indexes": [{"name": "platform"}, {"name": "ml"}]})
    assert call(proxy.url + "/i/ml/simple/").status == 200
    proxy.update_config({"indexes": [{"name": "platform"}, {"name": "ml"}, {"name": "new"}]})
    proxy.sighup()
    assert eventually(lambda: "restart to apply" in proxy.log_text())
    assert call(proxy.url + "/i/new/simple/").status == 404  # not served before a restart
    assert call(proxy.url + "/i/ml/simple/").status == 200
    # The same indexes with another change: applied at once.
    proxy.update_config({"indexes": [{"name": "platform"}, {"name": "ml"}],
                         "upstream": {"forward": False}})
    proxy.sighup()
    assert eventually(lambda: "config reloaded" in proxy.log_text())
    assert b"forwarding upstream is off" in call(proxy.url + "/simple/anything/").body
