"""On the real default model: a briefly trained alpaca adapter stops at its template's turn
markers, and `lorakit generate`, the OpenAI API and the UI give the same greedy answers, for the
base alone (its own chat template) and for the adapter (its training template)."""

import json
import os
import subprocess
import sys

import pytest

from lorakit.infer.generate import GenerationParams

# heavy: about 3 minutes (a brief training run on the real model), so a .ci/run step of its own
pytestmark = [pytest.mark.slow, pytest.mark.heavy]

HEALTH = "Give three tips for staying healthy."
WHO = "Who are you?"


def lorakit(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lorakit.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, shared_datasets, smollm2_path):
    """A 12-step adapter on real alpaca data, alpaca template (too short to have learned EOS well)."""
    work = tmp_path_factory.mktemp("twelve")
    records = json.loads((shared_datasets / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    (work / "data.json").write_text(json.dumps(records[:96]), encoding="utf-8")
    (work / "cfg.yaml").write_text(
        f"base_model: {smollm2_path}\ndata_path: data.json\noutput_dir: out\nprompt_template_name: alpaca\n"
        "batch_size: 8\nmicro_batch_size: 4\nmax_steps: 12\nlearning_rate: 3e-4\nlr_scheduler_type: cosine\n"
        "warmup_steps: 10\ncutoff_len: 256\nlora_target_modules: [q_proj, k_proj, v_proj, o_proj]\n"
        "logging_steps: 4\n",
        encoding="utf-8",
    )
    r = lorakit("train", "cfg.yaml", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    return work / "out"


def test_a_briefly_trained_adapter_answers_one_turn(adapter):
    r = lorakit("generate", "--adapter", str(adapter), "--max-new-tokens", "160", HEALTH, cwd=adapter.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    answer = r.stdout.strip()
    assert answer and "### Response:" not in answer and "### Instruction:" not in answer, answer


def test_generate_api_and_ui_agree_on_the_real_model(adapter, smollm2_path):
    from lorakit.infer.generate import Generator
    from lorakit.serve.engine import Engine
    from lorakit.ui.inference import ModelSession, Speaker

    params = GenerationParams(max_new_tokens=48)
    engine = Engine(str(smollm2_path), base_name="base")
    try:
        engine.load_adapter("twelve", adapter)
        session = ModelSession()
        for name, folder in (("base", None), ("twelve", adapter)):
            gen = Generator(base=str(smollm2_path), adapter=str(folder) if folder else None)
            speaker = Speaker(
                base=str(smollm2_path), adapter_key=None if folder is None else name, adapter_folder=folder
            )
            for question in (WHO, HEALTH):
                cli = gen.generate(question, params=params)
                ids = engine.chat_prompt_ids(name, [("user", question)])
                assert ids == gen.prompt_ids(question)
                api = engine.generate_text(ids, model=name, max_tokens=params.max_new_tokens).text.strip()
                ui = session.answer(speaker, question, params=params)
                assert cli == api == ui, (name, question)
            assert gen.template.name == ("chat" if folder is None else "alpaca")
    finally:
        engine.shutdown()
