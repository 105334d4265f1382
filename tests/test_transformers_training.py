"""fastpeft-adapted transformers models: Trainer (bf16 autocast, gradient checkpointing with
use_reentrant True and False, gradient accumulation) and generate (merged and not)."""

import pytest
import torch

import fastpeft
from fastpeft import AdapterConfig, LowRankLinear

transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 64


def _llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def _gpt2(seed=0):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg)


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=8, length=12):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, length), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _adapter_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method,checkpointing", [
    ("lora", None), ("lamda", True), ("vera", False), ("adalora", True),
], ids=["lora-no-ckpt", "lamda-reentrant", "vera-nonreentrant", "adalora-reentrant"])
def test_trainer_bf16_checkpointing_accumulation(tmp_path, method, checkpointing):
    model = fastpeft.inject(_llama(), AdapterConfig(method=method, r=4, alpha=8, dropout=0.1,
                                                    target_modules=TARGETS))
    before = _adapter_snapshot(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    kwargs = {}
    if checkpointing is not None:
        kwargs = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-2, bf16=True, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
        dataloader_num_workers=0, disable_tqdm=True, **kwargs)
    # (transformers makes the embedding output require grad when checkpointing is enabled, so
    # reentrant checkpointed blocks see an input that needs grad and the adapters inside get one)
    dtypes = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data())
    result = trainer.train()
    hook.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}  # the op ran under bf16 autocast
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    after = dict(model.named_parameters())
    for name, value in before.items():
        changed = not torch.equal(after[name].detach(), value)
        assert changed == (name in trainable), f"{name}: changed={changed}, trainable={name in trainable}"
        assert after[name].dtype == value.dtype  # the master weights stay fp32 under bf16 autocast
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_checkpointing_gradients_equal_plain(use_reentrant, make):
    """Recomputation regenerates the same dropout masks: checkpointed gradients equal plain ones."""
    grads = []
    for checkpoint in (False, True):
        model = make()
        targets = ["q_proj", "v_proj", "down_proj"] if make is _llama else None
        if make is _gpt2:  # GPT-2's Conv1D layers are adapted through PEFT's format
            peft = pytest.importorskip("peft")
            model = fastpeft.from_peft(peft.get_peft_model(model, peft.LoraConfig(
                r=4, target_modules=["c_attn", "c_fc"], lora_dropout=0.2, fan_in_fan_out=True)))
            for m in model.modules():
                if isinstance(m, LowRankLinear):
                    torch.nn.init.normal_(m.lora_B)
        else:
            model = fastpeft.inject(model, AdapterConfig(method="lora", r=4, dropout=0.2, target_modules=targets))
        model.train()
        if checkpoint:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        ids = _Data().ids[:2]
        torch.manual_seed(7)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    plain, ckpt = grads
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_accumulation_equals_one_big_batch():
    ids = _Data().ids[:4]
    out = []
    for chunks in (1, 2):
        model = fastpeft.inject(_llama(), AdapterConfig(method="lamda", r=4, target_modules=TARGETS))
        for part in ids.chunk(chunks):
            (model(input_ids=part, labels=part).loss / chunks).backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in out[0]:
        torch.testing.assert_close(out[1][name], out[0][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("make,method", [(_llama, "lora"), (_llama, "lamda"), (_llama, "vera"), (_gpt2, "lora")],
                         ids=["llama-lora", "llama-lamda", "llama-vera", "gpt2-lora"])
def test_generate_merged_and_unmerged(make, method):
    model = make()
    if make is _gpt2:  # GPT-2's Conv1D layers are adapted through PEFT's format
        peft = pytest.importorskip("peft")
        model = fastpeft.from_peft(peft.get_peft_model(model, peft.LoraConfig(
            r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)))
    else:
        model = fastpeft.inject(model, AdapterConfig(method=method, r=4, target_modules=TARGETS))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LowRankLinear):
                m.lora_B.normal_(std=0.5)
                if m.lora_core is not None:
                    m.lora_core.normal_()
                if m.lora_out_scale is not None:
                    m.lora_out_scale.normal_()
    model.eval()
    prompt = _Data().ids[:2, :5]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    unmerged = model.generate(prompt, **kwargs)
    assert unmerged.shape == (2, 11)
    with torch.no_grad():
        logits = model(input_ids=unmerged).logits
        assert (logits - make().eval()(input_ids=unmerged).logits).abs().max() > 1e-3  # the adapter acts
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    for m in layers:
        m.merge()
    merged = model.generate(prompt, **kwargs)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=unmerged).logits, logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(merged, unmerged)
    for m in layers:
        m.unmerge()
    assert torch.equal(model.generate(prompt, **kwargs), unmerged)
