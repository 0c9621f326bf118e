"""Who may open the page: `lorakit ui` answers on this machine only (127.0.0.1) unless told
otherwise, and an address other machines can reach needs a login (Gradio's own ``auth=``, never
a login of lorakit's). Plain functions, no Gradio: the command checks its options with them
before Gradio or any model is imported.

Users come from ``--auth USER:PASS``, ``--auth-file PATH`` (one ``user:password`` line per user)
or the environment variable ``LORAKIT_UI_AUTH=USER:PASS``. A password on the command line can be
read by every user of the machine (``ps``); the file (mode 600) and the variable cannot.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from pathlib import Path

from ..errors import LorakitError

AUTH_ENV = "LORAKIT_UI_AUTH"
DEFAULT_MAX_UPLOAD_MB = 512
MB = 1024 * 1024

Users = list[tuple[str, str]]


def _loopback_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # fe80::1%eth0: the scope is not the address
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or ip).is_loopback


def is_loopback(host: str) -> bool:
    """True when every address ``host`` stands for is a loopback one (127.0.0.0/8, ::1): only this
    machine can connect. 0.0.0.0, ::, a LAN address or a name resolving to one are not. A host
    that does not resolve is one error line."""
    host = (host or "").strip()
    if not host:
        return False  # "" is every address to a server
    try:
        return _loopback_address(host)
    except ValueError:
        pass  # a name: what it resolves to
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise LorakitError(f"--host {host}: not an address of this machine ({e})") from None
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(_loopback_address(a) for a in addresses)


def parse_user(value: str, where: str) -> tuple[str, str]:
    """``USER:PASS`` (split at the first colon; the password may hold more) -> (user, password).
    ``where`` names the source in the error line; the value itself is never repeated (it holds
    the password)."""
    user, sep, password = (value or "").partition(":")
    user = user.strip()
    if not sep:
        raise LorakitError(f"{where}: expected USER:PASS (a user name, a colon, a password)")
    if not user:
        raise LorakitError(f"{where}: the user name before ':' is empty")
    if not password:
        raise LorakitError(f"{where}: the password after '{user}:' is empty")
    if any(ord(c) < 32 or c == "\x7f" for c in user + password):
        raise LorakitError(f"{where}: control characters in the user name or password")
    return user, password


def read_auth_file(path: str | Path) -> Users:
    """The users of an auth file: one ``user:password`` line each; blank lines and lines starting
    with ``#`` are skipped. A missing, unreadable, empty or malformed file is one error line naming
    the file (and the line)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LorakitError(f"--auth-file {path}: no such file") from None
    except IsADirectoryError:
        raise LorakitError(f"--auth-file {path}: is a folder, not a file of user:password lines") from None
    except UnicodeDecodeError:
        raise LorakitError(f"--auth-file {path}: not a UTF-8 text file of user:password lines") from None
    except OSError as e:
        raise LorakitError(f"--auth-file {path}: cannot be read ({e.strerror or e})") from None
    users: Users = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, password = parse_user(line, f"--auth-file {path}: line {number}")
        if user in seen:
            raise LorakitError(f"--auth-file {path}: line {number}: user {user!r} again (first on line {seen[user]})")
        seen[user] = number
        users.append((user, password))
    if not users:
        raise LorakitError(f"--auth-file {path}: holds no user:password line")
    return users


def auth_file_warning(path: str | Path) -> str | None:
    """A line to print when other users of the machine may read the auth file."""
    try:
        mode = Path(path).expanduser().stat().st_mode
    except OSError:
        return None
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"warning: --auth-file {path} can be read by other users of this machine: chmod 600 {path}"
    return None


def resolve_users(host: str, auth: str | None, auth_file: str | Path | None, env: dict | None = None) -> Users | None:
    """The users who may log in, or None for no login (only on a loopback --host). Refuses, in one
    line saying what to add, a --host other machines can reach without users."""
    env = os.environ if env is None else env
    if auth is not None and auth_file is not None:
        raise LorakitError("--auth and --auth-file: give one of them")
    if auth_file is not None:
        users = read_auth_file(auth_file)
    elif auth is not None:
        users = [parse_user(auth, "--auth")]
    elif env.get(AUTH_ENV):
        users = [parse_user(env[AUTH_ENV], AUTH_ENV)]
    else:
        users = None
    if users is None and not is_loopback(host):
        raise LorakitError(
            f"--host {host}: other machines can reach this address, so the page needs a login: add "
            f"--auth-file PATH (one user:password line per user), --auth USER:PASS or {AUTH_ENV}=USER:PASS; "
            "or keep --host 127.0.0.1 and forward the port with ssh (docs/ui.md)"
        )
    return users


def check_max_upload_mb(value: int) -> int:
    if value < 1:
        raise LorakitError(f"--max-upload-mb {value}: must be at least 1")
    return value
