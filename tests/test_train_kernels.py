"""The memory-saving autograd functions (train/kernels.py): the same loss and gradients as the
plain modules, with less saved for the backward pass."""

from __future__ import annotations


import pytest

from bench.fixtures import build_tiny_qwen2
from tests.train_fixture import recipe


def test_fused_silu_mlp_keeps_loss_and_gradients_and_saves_less(tmp_path):
    """The MLP's silu(gate) * up recomputed in the backward: the same loss and gradients (every
    parameter of a full model), and less saved for the backward."""
    import torch
    from transformers import AutoModelForCausalLM

    from train.kernels import fuse_silu_mlps, label_only_loss
    from train.trainer import PadCollator

    path = build_tiny_qwen2(tmp_path / "m", initializer_range=0.2)
    batch = PadCollator(pad_id=0)(
        [
            {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
            {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]},
        ]
    )

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

    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    gelu = Qwen2Config(**small, num_attention_heads=2, num_key_value_heads=1, hidden_act="gelu_pytorch_tanh")
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
    batch = PadCollator(pad_id=0)(
        [
            {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
            {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]},
        ]
    )
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
        torch.testing.assert_close(
            grads[name],
            grad,
            rtol=1e-4,
            atol=1e-5,  # the 1/(1-p) is applied elsewhere
            msg=lambda m, name=name: f"{name}: {m}",
        )
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
    features = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
        {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]},
        {"input_ids": [13, 14, 15, 16, 17, 18, 19], "labels": [-100] * 4 + [17, 18, 19]},
    ]
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
            ours.item() * 8 / 16, rel=1e-6
        )
    empty = PadCollator(pad_id=0)([{"input_ids": [5, 6], "labels": [-100, -100]}])
    loss, labelled = label_only_loss(model, empty, num_items_in_batch=4)
    assert labelled == 0 and loss.item() == 0
    loss.backward()
