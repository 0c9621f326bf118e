"""Who may open the page (ui/security.py): a --host other machines can reach needs users
(--auth-file, --auth or LORAKIT_UI_AUTH), given to Gradio's own login; never a share link; the
upload limit reaches Gradio. The command's refusals are in test_ui_cli.py, the login of a live page
in test_ui_browser.py."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from lorakit.errors import LorakitError
from lorakit.ui.security import (
    AUTH_ENV,
    auth_file_warning,
    check_max_upload_mb,
    is_loopback,
    parse_user,
    read_auth_file,
    resolve_users,
)


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("10.0.0.1", False),
        ("fe80::1%eth0", False),
        ("", False),
    ],
)
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) is loopback


def _resolving_to(monkeypatch, *addresses):
    def fake(host, port, *args, **kwargs):
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in addresses
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake)


def test_a_name_counts_by_every_address_it_resolves_to(monkeypatch):
    _resolving_to(monkeypatch, "127.0.0.1", "::1")
    assert is_loopback("my-laptop")
    _resolving_to(monkeypatch, "127.0.1.1", "192.168.1.20")  # one address others can reach is enough
    assert not is_loopback("my-laptop")
    with pytest.raises(LorakitError, match="--host my-laptop: other machines can reach"):
        resolve_users("my-laptop", None, None, env={})


def test_an_unknown_host_is_one_line():
    with pytest.raises(LorakitError, match=r"^--host no-such-host\.invalid: not an address of this machine"):
        is_loopback("no-such-host.invalid")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20"])
def test_a_reachable_host_without_users_is_refused_saying_what_to_add(host):
    with pytest.raises(LorakitError) as e:
        resolve_users(host, None, None, env={})
    message = str(e.value)
    assert message.startswith(f"--host {host}: ") and "\n" not in message
    assert "--auth-file PATH" in message and "--auth USER:PASS" in message and AUTH_ENV in message


def test_users_from_each_source(tmp_path):
    assert resolve_users("127.0.0.1", None, None, env={}) is None  # this machine only: no login
    assert resolve_users("0.0.0.0", "ann:pw", None, env={}) == [("ann", "pw")]
    assert resolve_users("127.0.0.1", "ann:pw", None, env={}) == [("ann", "pw")]  # asked for: kept on loopback
    assert resolve_users("0.0.0.0", None, None, env={AUTH_ENV: "bob:a:b"}) == [("bob", "a:b")]
    users = tmp_path / "users"
    users.write_text("# the page's users\nann:first pw\n\n  bob:x:y  \n")
    assert resolve_users("::", None, users, env={AUTH_ENV: "eve:ignored"}) == [("ann", "first pw"), ("bob", "x:y")]
    with pytest.raises(LorakitError, match="--auth and --auth-file: give one"):
        resolve_users("0.0.0.0", "ann:pw", users, env={})


@pytest.mark.parametrize(
    "value, expected",
    [
        ("annpw", "expected USER:PASS"),
        (":hunter2", "the user name before ':' is empty"),
        ("ann:", "the password after 'ann:' is empty"),
        ("ann:pass\x00word", "control characters"),
    ],
)
def test_bad_user_pass_is_one_line_without_the_password(value, expected):
    with pytest.raises(LorakitError) as e:
        parse_user(value, "--auth")
    assert str(e.value).startswith("--auth: ") and expected in str(e.value)
    secret = value.partition(":")[2]
    assert not secret or secret not in str(e.value)  # the password is never repeated


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "no such file"),
        ("", "holds no user:password line"),
        ("# only a comment\n\n", "holds no user:password line"),
        ("ann:pw\nbob\n", "line 2: expected USER:PASS"),
        ("ann:pw\n:pw\n", "line 2: the user name before ':' is empty"),
        ("ann:pw\n\nann:other\n", "line 3: user 'ann' again (first on line 1)"),
        (b"\xff\xfe", "not a UTF-8 text file"),
    ],
)
def test_a_bad_auth_file_is_one_line_naming_the_file_and_line(tmp_path, content, expected):
    path = tmp_path / "users"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(LorakitError) as e:
        read_auth_file(path)
    assert str(e.value).startswith(f"--auth-file {path}: ") and expected in str(e.value), str(e.value)
    assert "\n" not in str(e.value) and "pw" not in str(e.value).replace(str(path), "")


def test_auth_file_a_folder_is_refused(tmp_path):
    with pytest.raises(LorakitError, match="is a folder"):
        read_auth_file(tmp_path)


@pytest.mark.skipif(os.name != "posix", reason="file modes")
def test_an_auth_file_others_can_read_is_warned_about(tmp_path):
    path = tmp_path / "users"
    path.write_text("ann:pw\n")
    path.chmod(0o644)
    assert f"chmod 600 {path}" in auth_file_warning(path)
    path.chmod(0o600)
    assert auth_file_warning(path) is None


def test_max_upload_mb_is_checked():
    assert check_max_upload_mb(1) == 1
    with pytest.raises(LorakitError, match="--max-upload-mb 0: must be at least 1"):
        check_max_upload_mb(0)


def test_launch_gives_gradio_the_login_the_limit_and_no_share_link(tmp_path, monkeypatch):
    """What app.launch hands to Gradio's own launch(): the users as auth=, max_file_size, and
    share=False even where GRADIO_SHARE=true asks for a link."""
    import gradio as gr

    from lorakit.ui import app

    calls = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: calls.append(kwargs))
    monkeypatch.setenv("GRADIO_SHARE", "true")
    previous = signal.getsignal(signal.SIGTERM)  # launch() makes SIGTERM end the page
    try:
        app.launch(tmp_path / "wd", host="127.0.0.1", port=0, users=[("ann", "pw")], max_upload_bytes=3 * 2**20)
        app.launch(tmp_path / "wd", host="127.0.0.1", port=0)
    finally:
        signal.signal(signal.SIGTERM, previous)
    with_login, without = calls
    assert with_login["share"] is False and without["share"] is False
    assert with_login["auth"] == [("ann", "pw")] and without["auth"] is None
    assert with_login["max_file_size"] == 3 * 2**20 and without["max_file_size"] == 512 * 2**20
    assert with_login["server_name"] == "127.0.0.1"
