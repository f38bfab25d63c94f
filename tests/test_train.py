"""The thin trainer on a tiny random-weight model: loss falls, resume after kill -9 repeats the
uninterrupted run, a diverging loss stops cleanly, and the merged model matches base+adapter."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from core.errors import UserError
from bench.fixtures import build_tiny_qwen2
from tests.conftest import REPO
from train.recipe import Recipe

ROWS = [{"prompt": f"问题{i}", "completion": f"答案是{i * 7}号"} for i in range(8)]


def recipe(data_path, **training) -> Recipe:
    return Recipe.model_validate({
        "name": "t", "data": [{"path": str(data_path)}], "split": [1.0, 0.0, 0.0],
        "quantization": training.pop("quantization", "nf4"),
        "compute_dtype": training.pop("compute_dtype", "auto"),
        "lora": {"r": 8, "alpha": 16, "dropout": training.pop("lora_dropout", 0.0)},
        "training": {"max_steps": 40, "batch_size": 4, "learning_rate": 1e-2, "scheduler": "constant",
                     "warmup_ratio": 0.0, "gradient_checkpointing": False, "logging_steps": 1,
                     "eval_steps": 1000, "save_steps": 10, "sample_steps": 20, **training},
        "samples": {"prompts": ["问题1"], "facts": [["7号"]], "max_new_tokens": 6},
    })



def provenance(**given) -> dict:
    """What `make train` hands the merge to write beside the merged weights."""
    return {"base_card": "tiny", "base_weights_sha256": None, "adapter_config": {}, "adapter_sha256": "0" * 64,
            "data_sha256": "1" * 64, "recipe": {}, "recipe_sha256": None, "final_train_loss": None,
            "final_val_loss": None, "steps": 1, **given}

@pytest.fixture
def setup(tmp_path):
    model = build_tiny_qwen2(tmp_path / "model", initializer_range=0.2)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    return model, data


def log_records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r and "sample" not in r]


@pytest.mark.parametrize("quantization", ["nf4", "int8", "none"])
def test_loss_falls_on_a_memorisable_set(tmp_path, setup, quantization):
    from train.trainer import run_training

    model, data = setup
    result = run_training(recipe(data, quantization=quantization), str(model), tmp_path / "run", tmp_path)
    curve = [loss for _, loss in losses(tmp_path / "run")]
    assert result.steps == 40 and len(curve) == 40
    assert curve[-1] < 0.5 * curve[0], curve
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    samples = [r for r in log if "sample" in r]
    assert [s["step"] for s in samples] == [20, 40] and all("learning_rate" in r for r in log if "loss" in r)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("quantization,layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt"), ("none", None)])
def test_quantization_builds_the_layers_it_names(setup, quantization, layer):
    from train.trainer import load_for_training

    model, data = setup
    m = load_for_training(recipe(data, quantization=quantization), str(model), False)
    kinds = {type(mod).__name__ for mod in m.modules()}
    assert (layer in kinds) if layer else not kinds & {"Linear4bit", "Linear8bitLt"}, kinds


@pytest.mark.parametrize("avx512_bf16,amx,explicit,expected", [
    (True, False, "auto", "bfloat16"), (False, True, "auto", "bfloat16"), (False, False, "auto", "float32"),
    (True, False, "fp32", "float32"), (False, False, "bf16", "bfloat16")])
def test_auto_compute_dtype_is_bf16_only_on_cpus_that_multiply_it(
        tmp_path, setup, monkeypatch, avx512_bf16, amx, explicit, expected):
    import torch

    from train.trainer import compute_dtype, load_for_training

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    model, data = setup
    r = recipe(data, compute_dtype=explicit)
    assert compute_dtype(r) == getattr(torch, expected)
    if explicit == "auto":
        import bitsandbytes as bnb

        layers = [m for m in load_for_training(r, str(model), False).modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers and {m.compute_dtype for m in layers} == {getattr(torch, expected)}


def test_collapse_is_flagged():
    from eval.scorers.text import degenerate

    assert degenerate("") == "empty reply"
    assert degenerate("哈哈哈哈哈哈哈哈哈哈") is not None
    assert degenerate("云栈盘免费版为每个账号提供15GB存储空间。") is None
    assert degenerate("心情不好，情绪低落，" * 8).startswith("a phrase repeats")
    long_reply = ("辛苦你了，连轴转谁都会累的。先好好吃顿饭，把能推的事情列出来，找机会和老板温和地谈谈工作量，"
                  "你的休息也很重要哦。")
    assert degenerate(long_reply) is None


NAN = float("nan")
GUARD_CASES = [
    # (losses, gradient norms, problem expected (a pattern) or None, first bad step)
    ([2.0, 1.8, 1.5, 1.2], [1.0, 0.9, 0.8, 0.7], None, None),
    ([2.0, 1.8, NAN], [1.0, 0.9, 0.8], r"loss became nan at step 3", 3),
    ([2.0, 1.8, 1.7], [1.0, 0.9, NAN], r"gradient norm became nan at step 3", 3),
    ([2.0, 5.0, 9.0], [1.0, 3.0, 9.0], r"diverged at step 3: 9.000 > 4.0 x the first logged 2.000", 3),
    # the AMX machine's run: the loss rises, then no gradient and a frozen loss
    ([2.0, 4.0, 5.7, 5.7, 5.7, 5.7], [1.0, 7.0, 0.0, 0.0, 0.0, 0.0], r"collapsed at step 3: .* 3 logs", 3),
    # zero gradients that do not last collapse_logs logs are not a collapse
    ([2.0, 1.9, 1.9, 1.8, 1.7, 1.7], [1.0, 0.0, 0.0, 0.5, 0.0, 0.0], None, None),
]


@pytest.mark.parametrize("losses_, norms, problem, bad_step", GUARD_CASES)
def test_the_guard_stops_divergence_and_collapse_at_the_first_bad_step(losses_, norms, problem, bad_step):
    from types import SimpleNamespace

    from train.callbacks import TrainingGuard

    guard = TrainingGuard(divergence_factor=4.0, collapse_logs=3)
    control = SimpleNamespace(should_training_stop=False, should_save=True)
    for step, (loss, norm) in enumerate(zip(losses_, norms), start=1):
        guard.on_log(None, SimpleNamespace(global_step=step), control, logs={"loss": loss, "grad_norm": norm})
        if guard.problem:
            break
    if problem is None:
        assert guard.problem is None and not control.should_training_stop
    else:
        assert re.search(problem, guard.problem), guard.problem
        assert guard.bad_step == bad_step and control.should_training_stop and not control.should_save


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, setup):
    from train.trainer import run_training

    model, data = setup
    bad = recipe(data, quantization="none", learning_rate=50.0, save_steps=1, max_steps=30)
    # Too high a learning rate ends as a NaN, a blown-up loss or a collapse (zero gradients, a
    # frozen loss), by the CPU's or GPU's kernels: each stops the run the same way.
    with pytest.raises(UserError, match=r"(diverged|became nan|collapsed) at step \d+.*stopped\. "
                                        r"Last good checkpoint") as err:
        run_training(bad, str(model), tmp_path / "run", tmp_path)
    steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run" / "checkpoints").glob("checkpoint-*"))
    bad_step = int(re.search(r" at step (\d+)", str(err.value)).group(1))
    assert steps and max(steps) < bad_step
    assert not (tmp_path / "run" / "adapter").exists()


SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from pathlib import Path
    from tests.test_train import recipe
    from train.trainer import run_training
    run_training(recipe(Path({data!r}), quantization="none", lora_dropout=0.1, max_steps=30, save_steps=5),
                 {model!r}, Path(sys.argv[1]), Path({data!r}).parent)
""")


def test_kill_9_then_rerun_repeats_the_uninterrupted_run(tmp_path, setup):
    model, data = setup
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(repo=str(REPO), data=str(data), model=str(model)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, str(script), str(straight)], check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "checkpoint-15").is_dir() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists(), "killed too late to test resume"
    done = subprocess.run([sys.executable, str(script), str(killed)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = losses(straight), losses(killed)
    assert [s for s, _ in b] == list(range(1, 31))  # every step once: none lost, none repeated
    assert [s for s, _ in a] == [s for s, _ in b]
    assert [x for _, x in b] == pytest.approx([x for _, x in a], rel=1e-4)


def test_a_checkpoint_cut_short_by_a_kill_is_not_resumed_from(tmp_path):
    from train.resume import last_complete_checkpoint

    for step, state in [(10, "{}"), (15, "{}"), (20, None), (25, '{"trunc')]:
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        if state is not None:
            (path / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-15"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-15"]
    assert last_complete_checkpoint(tmp_path / "none") is None


def test_merge_matches_base_plus_adapter_and_loads(tmp_path, setup):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from train.merge import merge_adapter
    from train.trainer import run_training

    model, data = setup
    result = run_training(recipe(data, max_steps=10), str(model), tmp_path / "run", tmp_path)
    prompts = [[{"role": "user", "content": f"问题{i}"}] for i in range(4)]
    parity = merge_adapter(str(model), result.adapter_dir, tmp_path / "run" / "merged", parity_prompts=prompts,
                           max_new_tokens=8, tolerance=1e-3, provenance=provenance(base_card="tiny"))
    assert parity.passed and parity.same_replies == 4 and parity.max_abs_logit_diff < 1e-4
    merged = tmp_path / "run" / "merged"
    written = json.loads((merged / "provenance.json").read_text())
    assert written["base_card"] == "tiny" and written["parity"]["passed"] is True and written["schema_version"] == 1
    assert list(merged.glob("*.safetensors")) and not list(merged.glob("*.bin"))
    AutoModelForCausalLM.from_pretrained(merged)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), result.adapter_dir)
    # A tolerance nothing can meet (negative) fails the check and leaves no merged directory behind.
    with pytest.raises(UserError, match="merge parity failed"):
        merge_adapter(str(model), result.adapter_dir, tmp_path / "run" / "merged2", parity_prompts=prompts,
                      max_new_tokens=8, tolerance=-1.0, provenance=provenance())
    assert not (tmp_path / "run" / "merged2").exists()


def test_merge_parity_catches_a_merge_that_drops_the_adapter(tmp_path, setup, monkeypatch):
    """The check compares base+adapter with what merging made of the same model: a "merge" that
    only unloads the adapter changes the replies' logits and is refused."""
    from peft.tuners.tuners_utils import BaseTuner

    from train.merge import merge_adapter
    from train.trainer import run_training

    model, data = setup
    result = run_training(recipe(data, max_steps=10), str(model), tmp_path / "run", tmp_path)
    monkeypatch.setattr(BaseTuner, "merge_and_unload", BaseTuner.unload)
    with pytest.raises(UserError, match="merge parity failed"):
        merge_adapter(str(model), result.adapter_dir, tmp_path / "run" / "merged",
                      parity_prompts=[[{"role": "user", "content": "问题1"}]], max_new_tokens=4,
                      tolerance=1e-3, provenance=provenance())
    assert not (tmp_path / "run" / "merged").exists()


def adapter_weights(adapter_dir):
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def test_accumulation_and_checkpointing_make_the_same_update(tmp_path, setup):
    """Batch 4 in one step, in two accumulated micro-batches of 2, and with every layer or every
    second layer recomputed: the same examples, so the same gradients and the same adapter."""
    import torch

    from train.trainer import run_training

    model, data = setup
    runs = {
        "plain": {},
        "accum": {"batch_size": 2, "grad_accum": 2},
        "ckpt": {"gradient_checkpointing": True},
        "ckpt2": {"gradient_checkpointing": True, "checkpoint_every_n_layers": 2},
    }
    weights = {}
    for name, training in runs.items():
        # fp32 on a GPU too (its default is bf16), where accumulation order changes the last bits
        r = recipe(data, quantization="none", compute_dtype="fp32", max_steps=3, save_steps=1000,
                   sample_steps=1000, **training)
        weights[name] = adapter_weights(run_training(r, str(model), tmp_path / name, tmp_path).adapter_dir)
    from train.trainer import load_for_training

    for every, expected in ((1, [True] * 2), (2, [True, False])):  # the tiny model has 2 layers
        m = load_for_training(recipe(data, quantization="none", gradient_checkpointing=True,
                                     checkpoint_every_n_layers=every), str(model), False)
        assert [layer.gradient_checkpointing for layer in m.base_model.model.model.layers] == expected
    # cuBLAS picks other kernels for other batch shapes: on a GPU one element in 256 was 5e-5 off
    tol = {"rtol": 1e-3, "atol": 1e-4} if torch.cuda.is_available() else {"rtol": 1e-4, "atol": 1e-5}
    for name in ("accum", "ckpt", "ckpt2"):
        assert weights[name].keys() == weights["plain"].keys()
        for key, value in weights["plain"].items():
            torch.testing.assert_close(weights[name][key], value, **tol,
                                       msg=lambda m, name=name, key=key: f"{name}: {key}: {m}")
    # the test can fail: a different learning rate gives another adapter
    other = run_training(recipe(data, quantization="none", compute_dtype="fp32", max_steps=3, save_steps=1000,
                                sample_steps=1000, learning_rate=2e-2), str(model), tmp_path / "other", tmp_path)
    assert any(not torch.allclose(adapter_weights(other.adapter_dir)[k], v, **tol)
               for k, v in weights["plain"].items())


def test_modules_to_save_trains_the_head_and_merges(tmp_path, setup):
    from train.merge import merge_adapter
    from train.trainer import run_training

    model, data = setup
    r = recipe(data, quantization="none", max_steps=10)
    r = r.model_copy(update={"lora": r.lora.model_copy(update={"modules_to_save": ["lm_head"]})})
    result = run_training(r, str(model), tmp_path / "run", tmp_path)
    saved = adapter_weights(result.adapter_dir)
    assert any("lm_head" in k for k in saved), sorted(saved)[:5]
    curve = [loss for _, loss in losses(tmp_path / "run")]
    assert curve[-1] < 0.5 * curve[0]
    prompts = [[{"role": "user", "content": f"问题{i}"}] for i in range(3)]
    parity = merge_adapter(str(model), result.adapter_dir, tmp_path / "run" / "merged", parity_prompts=prompts,
                           max_new_tokens=6, tolerance=1e-3, provenance=provenance())
    assert parity.passed and parity.same_replies == 3


def test_fused_silu_mlp_keeps_loss_and_gradients_and_saves_less(tmp_path):
    """The MLP's silu(gate) * up recomputed in the backward: the same loss and gradients (every
    parameter of a full model), and less saved for the backward."""
    import torch
    from transformers import AutoModelForCausalLM

    from train.kernels import fuse_silu_mlps, label_only_loss
    from train.trainer import PadCollator

    path = build_tiny_qwen2(tmp_path / "m", initializer_range=0.2)
    batch = PadCollator(pad_id=0)([{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
                                   {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]}])

    def run(fuse: bool):
        model = AutoModelForCausalLM.from_pretrained(path)
        if fuse:
            assert fuse_silu_mlps(model) == 2  # both layers
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = label_only_loss(model, batch)
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters()}, sum(saved)

    plain_loss, plain_grads, plain_saved = run(False)
    loss, grads, fused_saved = run(True)
    assert loss == plain_loss
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert fused_saved < plain_saved, (fused_saved, plain_saved)
    # another activation is left as it is
    from transformers import Qwen2Config, Qwen2ForCausalLM

    gelu = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, hidden_act="gelu_pytorch_tanh")
    assert fuse_silu_mlps(Qwen2ForCausalLM(gelu)) == 0


def test_lora_dropout_in_lora_a_keeps_loss_and_gradients_and_saves_less(tmp_path):
    """lora_A doing its own dropout: with the same masks (drawn in the same order from the same
    generator) the same loss and gradients as dropout-then-linear, less kept for the backward
    pass, and a plain linear in eval mode."""
    import torch
    from peft.tuners.lora import LoraLayer

    from train.kernels import fuse_lora_dropout, label_only_loss
    from train.trainer import PadCollator, load_for_training

    path = build_tiny_qwen2(tmp_path / "m", initializer_range=0.2)
    batch = PadCollator(pad_id=0)([{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
                                   {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]}])
    r = recipe(tmp_path / "unused.jsonl", quantization="none", lora_dropout=0.3, compute_dtype="fp32")

    class RandDropout(torch.nn.Module):
        """Dropout that draws its mask as lora_dropout_function does."""

        def forward(self, x):
            return x * (torch.rand_like(x) >= 0.3) / 0.7 if self.training else x

    def run(fuse: bool, seed: int = 1):
        torch.manual_seed(0)  # LoRA's A matrices are drawn at random
        model = load_for_training(r, str(path), False)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # zero at the start: give the adapters (and their dropout) a say
                torch.nn.init.normal_(param, std=0.5)
        if fuse:
            assert fuse_lora_dropout(model) == 14  # 7 projections x 2 layers
        else:
            for module in model.modules():
                if isinstance(module, LoraLayer):
                    module.lora_dropout["default"] = RandDropout()
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        inputs = {k: v.to(model.device) for k, v in batch.items()}  # a GPU machine trains on it
        model.train()
        torch.manual_seed(seed)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = label_only_loss(model, inputs)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        model.eval()
        with torch.no_grad():
            eval_loss = label_only_loss(model, inputs)[0].item()
        return loss.item(), grads, sum(storages.values()), eval_loss

    plain_loss, plain_grads, plain_saved, plain_eval = run(False)
    loss, grads, saved, eval_loss = run(True)
    assert loss == pytest.approx(plain_loss, rel=1e-6) and eval_loss == plain_eval
    assert grads.keys() == plain_grads.keys() and len(grads) == 28
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5,  # the 1/(1-p) is applied elsewhere
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert saved < plain_saved, (saved, plain_saved)
    assert run(True, seed=2)[0] != loss  # the masks matter: the check above can fail


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_label_only_loss_equals_the_models_own_loss(tmp_path, softcap):
    """Chunked (3 positions at a time, so chunks end mid-row) or, with soft-capped logits, through
    the model's own head: the loss and every gradient equal the model's own loss's."""
    import torch
    from transformers import AutoModelForCausalLM

    from train.kernels import label_only_loss, plain_head
    from train.trainer import PadCollator

    model = AutoModelForCausalLM.from_pretrained(build_tiny_qwen2(tmp_path / "m", initializer_range=0.2))
    if softcap:  # qwen2 does not soft-cap; a wrapper that does checks the fallback
        model.config.final_logit_softcapping = softcap
        forward = model.forward

        def capped(*args, **kwargs):
            out = forward(*args, **kwargs)
            out.logits = softcap * torch.tanh(out.logits / softcap)
            if kwargs.get("labels") is not None:
                out.loss = model.loss_function(out.logits, kwargs["labels"], model.config.vocab_size)
            return out
        model.forward = capped
    assert plain_head(model.config) == (softcap is None)
    features = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
                {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]},
                {"input_ids": [13, 14, 15, 16, 17, 18, 19], "labels": [-100] * 4 + [17, 18, 19]}]
    batch = PadCollator(pad_id=0)(features)
    reference = model(**batch).loss
    reference.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ours, labelled = label_only_loss(model, batch, chunk=3)
    assert labelled == 3 + 2 + 3
    assert ours.item() == pytest.approx(reference.item(), rel=1e-6)
    ours.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        assert label_only_loss(model, batch, num_items_in_batch=16)[0].item() == pytest.approx(
            ours.item() * 8 / 16, rel=1e-6)
    empty = PadCollator(pad_id=0)([{"input_ids": [5, 6], "labels": [-100, -100]}])
    loss, labelled = label_only_loss(model, empty, num_items_in_batch=4)
    assert labelled == 0 and loss.item() == 0
    loss.backward()


def test_shipped_recipes_load_and_bad_keys_are_one_line(tmp_path):
    from train.recipe import TRAIN_DIR, load_recipe

    recipes = sorted(TRAIN_DIR.glob("*.yaml"))
    assert {p.stem for p in recipes} >= {"default", "quick"}
    for path in recipes:
        assert load_recipe(path).name == path.stem
        assert path.read_text().startswith("#") and "selectune train" in path.read_text().split("\n\n")[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ndata: [{task: fact}]\ntraining: {epochs: 1, lr: 0.1}\n")
    with pytest.raises(UserError) as err:
        load_recipe(bad)
    assert str(err.value).startswith(f"{bad}: unknown key 'training.lr' (expected one of ['batch_size', ")
    bad.write_text("name: bad\ndata: [{task: fact, path: x.jsonl}]\n")
    with pytest.raises(UserError, match="exactly one of 'task', 'path' or 'synth'"):
        load_recipe(bad)
    for value in ("weekly", "0"):
        bad.write_text(f"name: bad\ndata: [{{task: fact}}]\ntraining: {{eval_steps: {value}}}\n")
        with pytest.raises(UserError, match="training.eval_steps"):
            load_recipe(bad)


def test_epoch_schedule_evaluates_and_samples_once_an_epoch(tmp_path, setup):
    """`epoch` puts val loss and samples at each epoch's end; the final val loss is the one
    Trainer logged at the last step, not a second evaluation of the same weights."""
    from train.trainer import run_training

    model, data = setup
    r = recipe(data, quantization="none", max_steps=None, epochs=2, batch_size=2, eval_steps="epoch",
               sample_steps="epoch", save_steps=1000, cpu_allocator="glibc")
    r = r.model_copy(update={"split": (0.75, 0.25, 0.0)})
    result = run_training(r, str(model), tmp_path / "run", tmp_path)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    evals = [rec for rec in log if "eval_loss" in rec]
    assert result.steps == 6 and [rec["step"] for rec in evals] == [3, 6]
    assert result.final_val_loss == evals[-1]["eval_loss"]
    assert [rec["step"] for rec in log if "sample" in rec] == [3, 6]


def test_train_command_end_to_end(tmp_path, setup, capsys):
    """`selectune train` on a hub card given a tiny checkpoint: trains, merges with parity, scores
    the fact task on base and merged, and writes summary.json last."""
    from models.card import find_card
    from models.store import provision
    from selectune.cli import main

    model, _ = setup
    provision(find_card("qwen2.5-1.5b-instruct"), tmp_path / "cache" / "models", weights=model)
    recipe_path = tmp_path / "e2e.yaml"
    recipe_path.write_text(textwrap.dedent("""\
        # python -m selectune train --recipe e2e.yaml
        name: e2e
        data: [{task: fact, split: train}]
        max_length: 1024
        lora: {r: 4, alpha: 8, dropout: 0.0}
        training: {max_steps: 4, batch_size: 8, eval_steps: 2, save_steps: 2, sample_steps: 2,
                   gradient_checkpointing: false}
        samples: {tasks: [{task: fact, split: test, count: 1}], max_new_tokens: 4}
        parity: {items: 2, max_new_tokens: 4, task_items: 3}
        checkpoint_selection: {max_items: 40}
        checks: [{task: fact, split: test}, {task: style, split: test, metric: chrf}]
    """))
    args = ["--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "train", "--recipe", str(recipe_path)]) == 2  # no selection.json, no model
    assert "run `make select` first" in capsys.readouterr().err
    assert main([*args, "train", "--recipe", str(recipe_path), "--model", "qwen2.5-1.5b-instruct"]) == 0
    run = tmp_path / "runs" / "train" / "e2e-qwen2.5-1.5b-instruct"
    summary = json.loads((run / "summary.json").read_text())
    fact, style = summary["checks"]
    assert summary["steps"] == 4 and summary["parity"]["passed"] and summary["schema_version"] == 3
    assert (fact["task"], fact["metric"], fact["items"]) == ("fact", "fact_recall", 60)
    assert (style["task"], style["metric"], style["items"]) == ("style", "chrf", 36)
    assert {"diff", "ci95", "p_value", "verdict", "base", "merged"} <= set(fact)
    assert {p.name for p in (run / "data").iterdir()} == {"train.jsonl", "val.jsonl", "test.jsonl"}
    written = json.loads((run / "merged" / "provenance.json").read_text())
    assert written["base_card"] == "qwen2.5-1.5b-instruct" and len(written["data_sha256"]) == 64
    samples = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if '"sample"' in line]
    assert [s["step"] for s in samples] == [2, 4]
    assert summary["resumed_from"] is None and summary["contamination"]["duplicates"] == 0
    # the checks scored at both evaluations (6 of each split, seeded), the final step then chosen
    choice = summary["checkpoint"]
    assert choice["final_step"] == 4 and choice["chosen_step"] in (2, 4) and choice["reason"]
    assert sorted(choice["curves"]) == ["fact-test-gen", "style-test-gen"]
    assert [p["step"] for p in choice["curves"]["fact-test-gen"]] == [2, 4]
    assert {c["step"] for c in choice["comparisons"]} == {2}
    assert [r["step"] for r in log_records(run) if "checkpoint_eval" in r] == [2, 4]
    scores = json.loads((run / "checkpoint_evals" / "step-2" / "scores.json").read_text())
    assert [len(scores["entries"][k]["scores"]) for k in ("fact-test-gen", "style-test-gen")] == [40, 36]
    assert written["checkpoint_step"] == choice["chosen_step"]
    # the style check's 36 items were all scored at the merged step's evaluation, so the merged
    # side is read from there; scoring the written merged checkpoint gives the same
    assert [c["merged_scored_at"] for c in (fact, style)] == [
        "merged checkpoint", f"checkpoint evaluation of step {choice['chosen_step']}"]
    from core.settings import load_settings
    from eval.results import open_results
    from train.pipeline import check_comparison
    from train.recipe import CheckSpec

    settings = load_settings(runs_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"))
    card = find_card("qwen2.5-1.5b-instruct")
    merged_card = card.model_copy(update={"name": summary["merged_model"], "chat_template": "tokenizer",
                                          "add_bos": False})
    recomputed = check_comparison(CheckSpec(task="style", metric="chrf"), REPO / "tasks", card, merged_card,
                                  run / "merged", settings, open_results(tmp_path / "runs"))
    assert recomputed["merged_scored_at"] == "merged checkpoint"
    assert (recomputed["merged"], recomputed["diff"]) == (style["merged"], style["diff"])
    # three-way parity on the checks: fp32 base + adapter and its merge give the same outputs
    tasks = summary["parity"]["three_way"]["tasks"]
    assert set(tasks) == {"trained_vs_fp32_adapter", "trained_vs_merged_fp32", "fp32_adapter_vs_merged_fp32"}
    assert [(r["entry"], r["items"], r["same_outputs"]) for r in tasks["fp32_adapter_vs_merged_fp32"]] == [
        ("fact-test-gen", 3, 3), ("style-test-gen", 3, 3)]
    # run again (as after a kill once training had finished): it resumes from the last checkpoint,
    # trains no further step (Trainer alone would run a fifth) and writes the same adapter
    first = adapter_weights(run / "adapter")
    assert main([*args, "train", "--recipe", str(recipe_path), "--model", "qwen2.5-1.5b-instruct"]) == 0
    again = json.loads((run / "summary.json").read_text())
    assert again["resumed_from"].endswith("checkpoint-4") and again["steps"] == 4
    assert again["checkpoint"] == summary["checkpoint"]  # the evaluations were kept, not repeated
    assert adapter_weights(run / "adapter").keys() == first.keys()
    assert all(bool((adapter_weights(run / "adapter")[k] == v).all()) for k, v in first.items())


class _FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim",))
        return 1


@pytest.mark.parametrize("policy, exported, thresholds", [
    ("glibc", False, [(-3, 2 << 20), (-3, 32 << 20), (-1, 64 << 20)]),
    ("compact", False, [(-3, 2 << 20)]),
    ("glibc", True, []),
])
def test_cpu_allocator_loads_under_a_low_threshold_and_trims_after_every_pass(
        tmp_path, setup, monkeypatch, policy, exported, thresholds):
    """The model loads with glibc's mmap threshold at 2 MB; `glibc` then raises it to 32 MB
    (trim threshold 64 MB), `compact` keeps it; a threshold the user exported is left alone;
    the heap is trimmed after loading, after each pass (2 a step here) and each evaluation."""
    import ctypes

    from train.trainer import run_training

    libc = _FakeLibc()
    real_cdll = ctypes.CDLL
    monkeypatch.setattr(ctypes, "CDLL", lambda name, *a, **k: libc if name == "libc.so.6" else real_cdll(name, *a, **k))
    if exported:
        monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    model, data = setup
    r = recipe(data, quantization="none", max_steps=3, batch_size=2, grad_accum=2, eval_steps=2,
               sample_steps=1000, save_steps=1000, cpu_allocator=policy)
    r = r.model_copy(update={"split": (0.5, 0.5, 0.0)})  # 4 rows: one step of 2 passes an epoch
    run_training(r, str(model), tmp_path / "run", tmp_path)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    evaluations = sum("eval_loss" in rec for rec in log)
    assert evaluations == 2  # at step 2 and at the end
    assert [c[1:] for c in libc.calls if c[0] == "mallopt"] == thresholds
    assert sum(c[0] == "malloc_trim" for c in libc.calls) == 1 + 3 * 2 + evaluations


def test_three_way_parity_measures_what_training_optimised_against_both_merges(tmp_path, setup):
    """NF4 base + adapter (what training optimised) against fp32 base + adapter and the merged
    model, and the merge into the dequantised NF4 base, which is nearer to it than the fp32 merge."""
    import torch

    from train.merge import merge_adapter
    from train.trainer import run_training

    model, data = setup
    r = recipe(data, max_steps=10, compute_dtype="fp32")
    result = run_training(r, str(model), tmp_path / "run", tmp_path)
    prompts = [[{"role": "user", "content": f"问题{i}"}] for i in range(4)]
    parity = merge_adapter(str(model), result.adapter_dir, tmp_path / "run" / "merged", parity_prompts=prompts,
                           max_new_tokens=8, tolerance=1e-3, provenance=provenance(),
                           quantization="nf4", compute_dtype=torch.float32)
    three = parity.three_way
    assert parity.passed and three["merge_base"] == "fp32" and "trained_vs_merged_dequantized" not in three
    nf4_vs_fp32 = three["trained_vs_fp32_adapter"]
    assert nf4_vs_fp32["items"] == 4 and 0 < nf4_vs_fp32["max_abs_logit_diff"]  # the quantisation shift, measured
    assert three["trained_vs_merged_fp32"]["max_abs_logit_diff"] == pytest.approx(
        nf4_vs_fp32["max_abs_logit_diff"], abs=1e-3)
    dq = merge_adapter(str(model), result.adapter_dir, tmp_path / "run" / "merged-dq", parity_prompts=prompts,
                       max_new_tokens=8, tolerance=1e-3, provenance=provenance(),
                       quantization="nf4", compute_dtype=torch.float32, merge_base="dequantized")
    assert dq.passed
    to_dq = dq.three_way["trained_vs_merged_dequantized"]
    assert to_dq["max_abs_logit_diff"] < 0.1 * dq.three_way["trained_vs_merged_fp32"]["max_abs_logit_diff"]
    assert to_dq["same_replies"] == 4
    with pytest.raises(UserError, match="merge_base: dequantized needs a quantised base"):
        merge_adapter(str(model), result.adapter_dir, tmp_path / "run" / "m3", parity_prompts=prompts,
                      max_new_tokens=8, tolerance=1e-3, provenance=provenance(), merge_base="dequantized")
