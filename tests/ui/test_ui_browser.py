"""The page in a real browser: Playwright (Python) drives Debian's chromium, headless, against a
live `lorakit ui` whose base model is the tiny random Llama, started with a login (--auth-file) and
a 1 MB upload limit. Log in; upload data (too big, a wrong kind and a bad file first: each refused
with a message, nothing kept); two pages press Start together (one run starts, the other page is
told one is in progress); train a few steps, watch the progress reach Done, chat with the new
adapter, see base and adapter answer side by side, evaluate, export (--to hf, verified). A
screenshot of each tab goes to test-artifacts/ui/ (or $LORAKIT_TEST_ARTIFACTS). Without a
browser, the login is still checked over HTTP (test_the_page_demands_a_login).

The browser is Debian's package, never Playwright's download: the set-up below installs it
with apt-get when it is missing and this user may (root, or sudo without a password). Without
it the test is skipped with the reason, except where LORAKIT_REQUIRE_BROWSER=1 (CI): then it fails.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 60_000

pytestmark = pytest.mark.timeout(600)


def _artifacts() -> Path:
    folder = Path(os.environ.get("LORAKIT_TEST_ARTIFACTS") or REPO / "test-artifacts" / "ui")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _install_chromium() -> str | None:
    """Make /usr/bin/chromium exist (apt-get, as root or with passwordless sudo); None when it
    does, else why not."""
    if CHROMIUM.is_file():
        return None
    if shutil.which("apt-get") is None:
        return f"{CHROMIUM} is missing and there is no apt-get to install it (Debian's chromium package)"
    if getattr(os, "geteuid", lambda: -1)() == 0:
        prefix = []
    elif shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        prefix = ["sudo", "-n"]
    else:
        return f"{CHROMIUM} is missing and installing it needs root: sudo apt-get install -y chromium"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*prefix, "apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    if subprocess.run(install, env=env, capture_output=True, timeout=900).returncode != 0:
        subprocess.run([*prefix, "apt-get", "update"], env=env, capture_output=True, timeout=900)
        r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            return f"apt-get install chromium failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    return None if CHROMIUM.is_file() else f"apt-get installed chromium but {CHROMIUM} is still missing"


def _unavailable(reason: str):
    if os.environ.get("LORAKIT_REQUIRE_BROWSER") == "1":
        pytest.fail(f"LORAKIT_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[dev]')")
    reason = _install_chromium()
    if reason:
        _unavailable(reason)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield b
        b.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    """`lorakit ui` on a free port; the workdir holds the tiny model as models/tiny-llama."""
    root = tmp_path_factory.mktemp("ui-browser")
    workdir = root / "workdir"
    shutil.copytree(tiny_model_dir, workdir / "models" / "tiny-llama")
    port = _free_port()
    password = f"pw-{secrets.token_hex(8)}"
    users = root / "users.txt"
    users.write_text(f"# the page's users\ntester:{password}\n")
    users.chmod(0o600)
    log = (root / "ui.log").open("wb")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "LORAKIT_HOME": str(root / "lorakit-home"),
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lorakit.cli",
            "ui",
            "--workdir",
            str(workdir),
            "--port",
            str(port),
            "--auth-file",
            str(users),
            "--max-upload-mb",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=root,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"lorakit ui did not start:\n{(root / 'ui.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield {
        "url": url,
        "workdir": workdir,
        "root": root,
        "log": root / "ui.log",
        "user": "tester",
        "password": password,
        "pid": proc.pid,
    }
    proc.send_signal(signal.SIGTERM)  # the page closes like on Ctrl-C
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    shutil.copy(root / "ui.log", _artifacts() / "server.log")


def _choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option).first.click()


def test_the_page_demands_a_login(server):
    """Gradio's own login (auth=): without it the page's config, API, files, uploads and events
    answer 401, and the login page tells nothing of the workdir; a wrong password is refused, the
    right one opens the page; an upload over --max-upload-mb is refused by the server itself (not
    only by the browser). The password is in neither the command line (ps) nor the log."""
    import httpx

    workdir = str(server["workdir"])
    with httpx.Client(base_url=server["url"], timeout=30) as anyone:
        login_page = anyone.get("/")
        assert login_page.status_code == 200 and '"auth_required":true' in login_page.text
        assert workdir not in login_page.text  # no choices (file paths) before the login
        for method, path in [
            ("GET", "/config"),
            ("GET", "/gradio_api/info"),
            ("GET", f"/gradio_api/file={workdir}/models/tiny-llama/config.json"),
            ("POST", "/gradio_api/upload"),
            ("POST", "/gradio_api/queue/join"),
        ]:
            assert anyone.request(method, path).status_code == 401, path
        wrong = anyone.post("/login", data={"username": server["user"], "password": "not-" + server["password"]})
        assert wrong.status_code == 400 and anyone.get("/config").status_code == 401
    with httpx.Client(base_url=server["url"], timeout=30) as tester:
        assert tester.post("/login", data={"username": server["user"], "password": server["password"]}).is_success
        config = tester.get("/config")
        assert config.status_code == 200 and workdir in config.text
        big = tester.post("/gradio_api/upload", files={"files": ("big.jsonl", b"{}\n" * (2**20 // 3 + 1))})
        assert big.status_code == 413, big.text
    assert not list((server["workdir"] / "data").glob("big*"))
    cmdline = Path(f"/proc/{server['pid']}/cmdline")
    if cmdline.is_file():
        assert server["password"].encode() not in cmdline.read_bytes()
    assert server["password"] not in server["log"].read_text(errors="replace")


def _login(page, server) -> None:
    page.goto(server["url"])
    page.get_by_label("username").fill(server["user"])
    page.get_by_label("password").fill(server["password"])
    page.get_by_role("button", name="Login").click()
    page.wait_for_selector("#train-start")


def _fill_settings(page) -> None:
    """The short run: name browser-lora, 200 steps of batch 2, a checkpoint every 40 steps ("More
    settings" opened before, settled since)."""
    from playwright.sync_api import expect

    page.locator("#train-name input, #train-name textarea").first.fill("browser-lora")
    page.locator("#train-max-steps input").fill("200")  # a few seconds: long enough to be watched
    page.locator("#train-batch input").fill("2")
    page.locator("#train-micro-batch input").fill("2")
    page.locator("#train-save-steps input").fill("40")
    expect(page.locator("#train-save-steps input")).to_have_value("40")
    expect(page.locator("#train-eval-steps input")).to_have_value("50")  # eval_steps, beside save_steps


def test_train_chat_compare_in_a_browser(browser, server, tmp_path):
    from playwright.sync_api import expect

    shots = _artifacts()
    (shots / "failure.png").unlink(missing_ok=True)  # from an earlier failed run
    good = tmp_path / "sums.json"
    good.write_text(
        json.dumps(
            [
                {"instruction": f"What is {i} plus {i}?", "input": "", "output": f"{i} plus {i} is {2 * i}."}
                for i in range(24)
            ]
        )
    )
    bad = tmp_path / "broken.json"
    bad.write_text('[{"instruction": "no answer field"}]')
    big = tmp_path / "big.jsonl"  # over the server's --max-upload-mb 1
    big.write_text(json.dumps({"instruction": "x" * 100, "output": "y"}) * (2**20 // 100 + 1))
    notes = tmp_path / "notes.txt"
    notes.write_text("not data")

    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)  # (expect() waits as long; a context's default it does not take)
    try:
        _login(page, server)  # --auth-file: the page opens after Gradio's login

        # ---- Train: uploads refused (too big, wrong kind, bad records) and a good one, the preview
        upload = page.locator("#train-upload input[type=file]")
        upload.set_input_files(str(big))
        expect(page.get_by_text('exceed the maximum allowed size of 1.0 Mb: "big.jsonl"')).to_be_visible()
        upload.set_input_files(str(notes))
        expect(page.get_by_text("Invalid file type: notes.txt")).to_be_visible()
        for close in page.locator("[data-testid=toast-close]").all():
            close.click()
        assert list((server["workdir"] / "data").iterdir()) == []  # neither reached the workdir
        page.get_by_text("More settings").click()  # (a field filled while it opens may be reset)
        _choose(page, "train-base", "models/tiny-llama")
        page.locator("#train-upload input[type=file]").set_input_files(str(bad))
        expect(page.locator("#train-upload-msg")).to_contain_text("Upload refused")
        expect(page.locator("#train-upload-msg")).to_contain_text("broken.json: record 0")
        page.locator("#train-upload input[type=file]").set_input_files(str(good))
        expect(page.locator("#train-upload-msg")).to_contain_text("Saved as data/sums.json")
        expect(page.locator("#preview-info")).to_contain_text("record 1 of 24 (alpaca, template alpaca)")
        expect(page.locator("#train-preview")).to_contain_text("0 plus 0 is 0.")
        expect(page.locator("#train-preview")).to_contain_text("trained (in the loss)")

        # ---- a short run, Start pressed on two pages (two sessions) together: one run, one refusal
        _fill_settings(page)
        other = context.new_page()  # logged in already (the context's cookie), a session of its own
        other.set_default_timeout(TIMEOUT_MS)
        other.goto(server["url"])
        other.wait_for_selector("#train-start")
        other.get_by_text("More settings").click()
        _choose(other, "train-base", "models/tiny-llama")
        _choose(other, "train-dataset", "sums.json")
        _fill_settings(other)  # the same run: whichever page wins, it is browser-lora
        for p in (page, other):  # together: both buttons are still enabled (a page disables its own
            p.evaluate("document.querySelector('#train-start').click()")  # once it sees a run going)
        refusal = "Not started. error: a run is in progress (browser-lora)"
        messages = [p.locator("#train-start-msg") for p in (page, other)]
        deadline = time.time() + 60
        while time.time() < deadline and not any(refusal in m.inner_text() for m in messages):
            page.wait_for_timeout(100)
        page.wait_for_timeout(500)  # the other page's answer is in as well
        texts = [m.inner_text().strip() for m in messages]
        assert sorted(refusal in t for t in texts) == [False, True], texts  # one refused...
        assert sum("error" in t for t in texts) == 1, texts  # ...and the other started, no error
        other.close()
        expect(page.locator("#train-command")).to_contain_text("lorakit train ")
        expect(page.locator("#train-command")).to_contain_text("browser-lora/train.yaml")
        seen, deadline = [], time.time() + 180
        while time.time() < deadline:  # the page keeps answering while the run goes on
            line = page.locator("#train-progress").inner_text()
            if not seen or seen[-1] != line:
                seen.append(line)
            if "done" in line or "failed" in line:
                break
            page.wait_for_timeout(250)
        status = page.locator("#train-status").inner_text()
        assert "Done" in status, f"{status}\n{seen[-5:]}"
        assert any("training · step" in s and "tokens/s" in s and "time left" in s for s in seen), seen
        assert "browser-lora: done · step 200/200 · loss " in seen[-1]
        expect(page.locator("#train-loss-chart .mark-line path").first).to_be_attached()  # the loss curve
        page.locator("#train-copy-from input").click()  # the lists were refreshed when the run ended
        expect(page.get_by_role("option", name="browser-lora")).to_be_visible()
        page.keyboard.press("Escape")
        run = server["workdir"] / "adapters" / "browser-lora"
        assert "save_steps: 40\n" in (run / "train.yaml").read_text()  # the form's config, saved
        assert (run / "checkpoint-200" / "lorakit_checkpoint.json").is_file()
        page.screenshot(path=str(shots / "train.png"), full_page=True)

        # ---- Models: the new adapter and its manifest
        page.get_by_role("tab", name="Models").click()
        expect(page.locator("#models-table")).to_contain_text("browser-lora")
        _choose(page, "models-adapter", "browser-lora")
        expect(page.locator("#models-manifest")).to_contain_text('"global_steps": 200')
        page.screenshot(path=str(shots / "models.png"), full_page=True)

        # ---- Chat with the adapter (streamed into the chatbot)
        page.get_by_role("tab", name="Chat").click()
        _choose(page, "chat-adapter", "browser-lora")
        page.locator("#chat-system textarea").fill("You are a calculator.")
        page.locator("#chat-input textarea").fill("What is 3 plus 3?")
        page.locator("#chat-send").click()
        # the first answer loads the model into the server: more than expect()'s 5 s on a loaded machine
        expect(page.locator("#chat-status")).to_contain_text("answered by browser-lora", timeout=TIMEOUT_MS)
        expect(page.locator('#chat-bot [data-testid="user"]')).to_contain_text("What is 3 plus 3?")
        assert page.locator('#chat-bot [data-testid="bot"]').inner_text().strip()
        page.screenshot(path=str(shots / "chat.png"), full_page=True)

        # ---- Compare: the base and the adapter answer side by side
        page.get_by_role("tab", name="Compare").click()
        page.locator("#compare-prompt textarea").fill("What is 5 plus 5?")
        _choose(page, "compare-adapters", "browser-lora")
        page.keyboard.press("Escape")
        page.locator("#compare-run").click()
        expect(page.locator("#compare-status")).to_contain_text("template alpaca")
        expect(page.locator("#compare-answer-1")).to_contain_text("browser-lora")
        expect(page.locator("#compare-answer-1 textarea")).not_to_have_value("...")
        answers = [page.locator(f"#compare-answer-{i} textarea").input_value() for i in (0, 1)]
        assert all(a.strip() and a != "..." for a in answers), answers
        expect(page.locator("#compare-answer-0")).to_contain_text("base (tiny-llama)")
        page.screenshot(path=str(shots / "compare.png"), full_page=True)

        # ---- Evaluate: lorakit eval on the uploaded file, its report on the page
        page.get_by_role("tab", name="Evaluate").click()
        _choose(page, "eval-data", "sums.json")
        page.keyboard.press("Escape")
        _choose(page, "eval-adapters", "browser-lora")
        page.keyboard.press("Escape")
        page.locator("#eval-limit input").fill("2")
        page.locator("#eval-max-tokens input").fill("8")
        page.locator("#eval-run").click()
        expect(page.locator("#eval-status")).to_contain_text("Report in")
        expect(page.locator("#eval-table")).to_contain_text("browser-lora")
        expect(page.locator("#eval-report")).to_contain_text("Efficiency")  # the report's sections
        expect(page.locator("#eval-report")).to_contain_text("Samples")
        page.screenshot(path=str(shots / "evaluate.png"), full_page=True)

        # ---- Export: the adapter --to hf from the Export tab (a `lorakit export` subprocess), verified
        page.get_by_role("tab", name="Export").click()
        _choose(page, "export-adapter", "browser-lora")
        page.locator("#export-run").click()
        expect(page.locator("#export-command")).to_contain_text("lorakit export --adapter")
        expect(page.locator("#export-command")).to_contain_text("--to hf")
        expect(page.locator("#export-status")).to_contain_text("Exported to", timeout=180_000)
        expect(page.locator("#export-status")).to_contain_text("chat template ids identical")
        expect(page.locator("#export-status")).to_contain_text("top-1 agreement")
        expect(page.locator("#export-figures")).to_contain_text("top1_agreement")
        assert (server["workdir"] / "exports" / "browser-lora-hf" / "export.json").is_file()
        page.screenshot(path=str(shots / "export.png"), full_page=True)
    except BaseException:
        page.screenshot(path=str(shots / "failure.png"), full_page=True)
        raise
    finally:
        context.close()
