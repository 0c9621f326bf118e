"""Multi-process training on CPU: `torchrun --nproc_per_node 2` (gloo) running the `lorakit`
console script trains the same adapter as one process with the same global batch, only rank 0
writes, and the manifest records the world size. Plus: the distributed example configs load.

Why the adapters can match exactly: with batch_size 8 and micro_batch_size 4, one process
accumulates micro-batches b0 and b1 per optimizer step, and in two processes rank 0 gets b0 and
rank 1 gets b1 (accelerate shards each batch of the same seeded sampler order by rank). The
loss is divided by the token count of the whole global batch in both (num_items_in_batch,
gathered across processes: average_tokens_across_devices), so 1 process sums g0 + g1 and two
processes all-reduce-average 2*g0 and 2*g1 - the same numbers, bit for bit, in fp32. Measured
here: max abs difference 0.0, with lora_B weights up to ~0.025 after 5 steps. A real mismatch is
far bigger: the loss normalised per process instead (average_tokens_across_devices=False) gives
1.4e-2 on this test. The assertion allows 1e-6 so that a different reduction order in another
BLAS or with more threads cannot fail it, while any change in data or normalisation does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
TOLERANCE = 1e-6

pytestmark = [
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="needs torch.distributed with the gloo backend",
    ),
    # two-process runs (torchrun, accelerate launch): about 90 s, in the heavy step of .ci/run so
    # that the README's command keeps its margin with the fuzz, fault and soak tests in it
    pytest.mark.heavy,
]


def _lorakit_script() -> list[str]:
    """The installed console script, run by torchrun as an executable (--no-python); beside the
    interpreter first (a venv's bin/), then on PATH; else `python -m lorakit.cli`."""
    for candidate in (Path(sys.executable).parent / "lorakit", shutil.which("lorakit")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return ["--no-python", str(candidate)]
    return ["-m", "lorakit.cli"]


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        and not k.startswith(("TORCHELASTIC_", "ACCELERATE_"))
    }
    # torchrun gives each worker one thread; the single process gets the same, so the two runs
    # do the same arithmetic (and two processes do not fight over two cores)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        CUDA_VISIBLE_DEVICES="",
    )
    return env


def _run(cmd: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    took = time.time() - t0
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
        f"\n--- stderr\n{proc.stderr[-8000:]}"
    )
    return proc, took


def _torchrun(nproc: int, args: list[str], cwd: Path):
    return _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *_lorakit_script(),
            *args,
        ],
        cwd,
    )


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """The same config trained by 1 process (gradient accumulation 2) and by 2 processes
    (torchrun, gloo; gradient accumulation 1)."""
    work = tmp_path_factory.mktemp("distributed")
    data = work / "data.json"
    data.write_text(
        json.dumps(
            [
                {"instruction": f"What is {i} plus {i}?" + " Explain." * (i % 5), "input": "", "output": str(2 * i)}
                for i in range(32)
            ]
        )
    )
    cfg = work / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "base_model": str(tiny_model_dir),
                "data_path": str(data),
                "precision": "fp32",
                "seed": 7,
                "batch_size": 8,
                "micro_batch_size": 4,  # global batch 8 whatever the world size
                "lora_dropout": 0.0,  # dropout masks would differ per process
                "group_by_length": False,
                # 24 train examples = 3 steps per epoch: 5 steps cross an epoch boundary (reshuffle)
                "val_set_size": 8,
                "max_steps": 5,
                "eval_steps": 2,
                "save_steps": 2,
                "logging_steps": 1,
                "load_best_model_at_end": False,
                "learning_rate": 1e-2,
                "lr_scheduler_type": "linear",
                "warmup_steps": 1,
                "lora_target_modules": "all-linear",
            }
        )
    )
    one, t_one = _run([sys.executable, "-m", "lorakit.cli", "train", str(cfg), f"output_dir={work / 'one'}"], work)
    two, t_two = _torchrun(2, ["train", str(cfg), f"output_dir={work / 'two'}"], work)
    print(f"\n1 process: {t_one:.1f}s, 2 processes (torchrun): {t_two:.1f}s")
    return {"one": work / "one", "two": work / "two", "one_proc": one, "two_proc": two, "cfg": cfg, "work": work}


def test_two_processes_train_the_same_adapter_as_one(runs):
    a = load_file(str(runs["one"] / "adapter_model.safetensors"))
    b = load_file(str(runs["two"] / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float(t.abs().max()) for k, t in a.items() if "lora_B" in k)  # B starts at zero
    assert moved > 1e3 * TOLERANCE, f"training barely moved the adapter (max |B| {moved})"
    print(f"\n1 vs 2 processes: max abs difference {diff:.3g} (max |lora_B| {moved:.3g})")
    assert diff <= TOLERANCE, f"1 vs 2 processes: max abs difference {diff:.3g} (max |B| {moved:.3g})"

    # the same losses at every step, train and eval (eval is sharded across the 2 processes)
    def losses(out):
        return [
            (r["step"], r.get("loss"), r.get("eval_loss"))
            for r in map(json.loads, (out / "train_log.jsonl").open())
            if "loss" in r or "eval_loss" in r
        ]

    l1, l2 = losses(runs["one"]), losses(runs["two"])
    assert [s for s, *_ in l1] == [s for s, *_ in l2]
    for (s, loss1, ev1), (_, loss2, ev2) in zip(l1, l2):
        for x, y in ((loss1, loss2), (ev1, ev2)):
            assert (x is None) == (y is None) and (x is None or abs(x - y) <= 1e-5), (s, l1, l2)


def test_manifest_records_world_size(runs):
    m1 = json.loads((runs["one"] / "manifest.json").read_text())
    m2 = json.loads((runs["two"] / "manifest.json").read_text())
    assert m1["world_size"] == 1 and m2["world_size"] == 2
    assert m1["training"]["global_steps"] == m2["training"]["global_steps"] == 5
    assert m1["training"]["epochs"] == m2["training"]["epochs"]  # the same examples seen
    assert m1["data"] == m2["data"]
    saved_cfg = yaml.safe_load((runs["two"] / "lorakit_config.yaml").read_text())
    assert saved_cfg["micro_batch_size"] == 4 and saved_cfg["batch_size"] == 8


def _files(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.parts[len(out.parts)] != "runs"}


def test_only_rank_zero_writes(runs):
    one, two = runs["one"], runs["two"]
    f1, f2 = _files(one), _files(two)
    # The Trainer saves each process's RNG state into the checkpoint (rng_state_<rank>.pth, needed
    # to resume); one process writes rng_state.pth. Everything else is written once, by rank 0.
    per_rank = {f for f in f2 if Path(f).name.startswith("rng_state_")}
    assert per_rank == {f"checkpoint-{s}/rng_state_{r}.pth" for s in (2, 4, 5) for r in (0, 1)}
    assert {f for f in f1 if Path(f).name == "rng_state.pth"} == {f"checkpoint-{s}/rng_state.pth" for s in (2, 4, 5)}
    strip = lambda files: {f for f in files if not Path(f).name.startswith("rng_state")}  # noqa: E731
    assert strip(f2) == strip(f1)
    assert not [p for p in two.iterdir() if p.name.startswith((".saving-", "."))]

    # one line per log event (two writers would double them), one TensorBoard event file
    log1 = (one / "train_log.jsonl").read_text().splitlines()
    log2 = (two / "train_log.jsonl").read_text().splitlines()
    assert len(log2) == len(log1) and all(json.loads(line) for line in log2)
    train_steps = [json.loads(line)["step"] for line in log2 if "loss" in json.loads(line)]
    assert train_steps == [1, 2, 3, 4, 5]
    assert len(list((two / "runs").rglob("events.out.tfevents*"))) == 1

    # status lines come from rank 0 only
    err = runs["two_proc"].stderr
    assert err.count("lorakit done:") == 1 and err.count("lorakit data:") == 1, err[-3000:]
    assert "Adapter verified and saved" in err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_with_the_example_ddp_config(runs):
    """`accelerate launch --config_file examples/accelerate_ddp.yaml --num_processes 2` runs the
    console script the same way (MULTI_GPU is accelerate's torchrun launcher; without a GPU the
    Trainer uses the CPU and gloo) and trains the same adapter."""
    out = runs["work"] / "accel"
    proc, took = _run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(EXAMPLES / "accelerate_ddp.yaml"),
            "--num_processes",
            "2",
            "--main_process_port",
            str(_free_port()),
            *_lorakit_script(),
            "train",
            str(runs["cfg"]),
            f"output_dir={out}",
        ],
        runs["work"],
    )
    print(f"\n2 processes (accelerate launch): {took:.1f}s")
    assert json.loads((out / "manifest.json").read_text())["world_size"] == 2
    a = load_file(str(runs["one"] / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= TOLERANCE
    assert proc.stderr.count("lorakit done:") == 1


def test_batch_size_must_divide_by_world_size(runs):
    """batch_size 4 with micro_batch_size 4 cannot be split over 2 processes: a config error
    (exit 2, one line per process) before any model is loaded."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            *_lorakit_script(),
            "train",
            str(runs["cfg"]),
            "batch_size=4",
            f"output_dir={runs['work'] / 'bad'}",
        ],
        cwd=runs["work"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "must be a multiple of micro_batch_size x world size (4 x 2)" in proc.stderr
    assert not (runs["work"] / "bad" / "manifest.json").exists()


# ---- the example configs for GPUs (not run here: no GPU) load and agree with lorakit -----------


def test_distributed_example_configs_are_valid():
    from accelerate.commands.config.config_args import ClusterConfig

    from lorakit.config import load_config

    for name in ("qlora_7b_single_gpu.yaml", "multi_gpu.yaml"):
        cfg = load_config(EXAMPLES / name)
        assert cfg.batch_size % cfg.micro_batch_size == 0
    qlora = load_config(EXAMPLES / "qlora_7b_single_gpu.yaml")
    assert qlora.load_in_4bit and qlora.precision == "bf16" and qlora.gradient_checkpointing
    assert qlora.lora_target_modules == "all-linear"
    multi = load_config(EXAMPLES / "multi_gpu.yaml")
    for gpus in (1, 2, 4, 8):  # the same file on 1-8 GPUs
        assert multi.batch_size % (multi.micro_batch_size * gpus) == 0

    ddp = ClusterConfig.from_yaml_file(str(EXAMPLES / "accelerate_ddp.yaml"))
    assert ddp.distributed_type == "MULTI_GPU" and ddp.mixed_precision == "no"
    fsdp = ClusterConfig.from_yaml_file(str(EXAMPLES / "fsdp.yaml"))
    assert fsdp.distributed_type == "FSDP"
    assert fsdp.fsdp_config["fsdp_use_orig_params"] is True  # required with peft
    assert fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    ds = ClusterConfig.from_yaml_file(str(EXAMPLES / "accelerate_deepspeed.yaml"))
    assert ds.distributed_type == "DEEPSPEED" and ds.mixed_precision is None
    # accelerate refuses these next to a deepspeed_config_file
    assert set(ds.deepspeed_config) <= {"deepspeed_config_file", "zero3_init_flag", "deepspeed_multinode_launcher"}
    assert (REPO / ds.deepspeed_config["deepspeed_config_file"]).is_file()

    for stage in (2, 3):
        ds_json = json.loads((EXAMPLES / f"deepspeed_zero{stage}.json").read_text())
        assert ds_json["zero_optimization"]["stage"] == stage
        # the Trainer fills these from the lorakit config, so they cannot disagree with it
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
            assert ds_json[key] == "auto"
        assert ds_json["bf16"]["enabled"] == ds_json["fp16"]["enabled"] == "auto"
    assert (
        json.loads((EXAMPLES / "deepspeed_zero3.json").read_text())["zero_optimization"][
            "stage3_gather_16bit_weights_on_model_save"
        ]
        is True
    )


def test_group_by_length_is_the_same_for_one_and_two_processes(runs):
    """Length-grouped batches: lorakit sizes the sorting windows by the global batch, so both
    world sizes put the same examples in each optimizer step (transformers alone does not)."""
    work, cfg = runs["work"], runs["cfg"]
    args = ["train", str(cfg), "group_by_length=true", "max_steps=3", "eval_steps=100", "save_steps=100"]
    _run([sys.executable, "-m", "lorakit.cli", *args, f"output_dir={work / 'g1'}"], work)
    _torchrun(2, [*args, f"output_dir={work / 'g2'}"], work)
    a = load_file(str(work / "g1" / "adapter_model.safetensors"))
    b = load_file(str(work / "g2" / "adapter_model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= TOLERANCE
