"""Helpers for the server tests: persona adapters of the tiny model, each trained by lorakit to
give its own one-word answer, and a live `lorakit serve` subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

# Each adapter learns to answer every question with its own word; the base does not.
PERSONAS = {"fox": "fox", "dog": "dog", "paris": "Paris", "helper": "assistant"}
QUESTIONS = [
    "Who are you?",
    "What is the capital?",
    "Name an animal.",
    "Say something.",
    "What is 1 2 3?",
    "Describe the dog.",
    "Which task?",
    "Write a response.",
    "What is the input?",
    "Complete it.",
    "Who is quick?",
    "Where is France?",
]
# Held-out questions the adapters never saw (the load test asks these).
HELD_OUT = [
    "Who is the assistant?",
    "What jumps over the dog?",
    "Tell me the capital of France.",
    "Describe a task.",
    "What are you?",
    "Write an instruction.",
    "Say a number.",
    "Who is lazy?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_persona(model_dir: Path, folder: Path, answer: str, seed: int) -> Path:
    from lorakit.config import TrainConfig
    from lorakit.train.recipe import train

    data = folder.parent / f"{folder.name}.json"
    data.write_text(json.dumps([{"instruction": q, "input": "", "output": answer} for q in QUESTIONS]))
    train(
        TrainConfig(
            base_model=str(model_dir),
            data_path=str(data),
            output_dir=str(folder),
            batch_size=4,
            micro_batch_size=4,
            max_steps=30,
            learning_rate=2e-2,
            lora_r=8,
            lora_alpha=16,
            lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            val_set_size=0,
            save_steps=1000,
            logging_steps=10,
            precision="fp32",
            seed=seed,
            lora_dropout=0.0,
        )
    )
    return folder


class LiveServer:
    def __init__(self, proc: subprocess.Popen, port: int, key: str, log: Path):
        self.proc, self.port, self.key, self.log = proc, port, key, log
        self.url = f"http://127.0.0.1:{port}"

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def openai(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key, max_retries=0, timeout=120, **kw)


def start_server(base: Path, adapters_dir: Path, log: Path, *extra: str, key: str = "test-key") -> LiveServer:
    import httpx

    port = free_port()
    env = {**os.environ, "LORAKIT_API_KEY": key, "TOKENIZERS_PARALLELISM": "false"}
    out = open(log, "w")  # noqa: SIM115 - the server writes to it after this returns
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lorakit.cli",
            "serve",
            "--base",
            str(base),
            "--port",
            str(port),
            "--adapters-dir",
            str(adapters_dir),
            *extra,
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=env,
    )
    server = LiveServer(proc, port, key, log)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lorakit serve exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"lorakit serve did not start: {log.read_text()[-2000:]}")
