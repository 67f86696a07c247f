import json

import pytest
import torch

from moecl.backbone.clip import CLIPBackbone
from moecl.config import MoEConfig
from moecl.moe.model import MoEAdapterModel
from moecl.params import ParameterParts, parameter_counts

PROMPTS = ["a photo of a cat.", "a photo of a dog.", "a photo of a car."]


def _model(backbone, **moe):
    cfg = dict(num_experts=4, top_k=2)
    cfg.update(moe)
    return MoEAdapterModel(backbone, MoEConfig(**cfg))


def _train(model, task, steps, seed):
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.trainable_parameters(task), lr=1e-2, weight_decay=0.1)
    tokens = model.tokenize(PROMPTS)
    model.train()
    for _ in range(steps):
        pixels, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))
        logits = model.logit_scale * model.encode_image(pixels, task=task) @ model.encode_text(tokens, task=task).t()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(logits, labels).backward()
        optimizer.step()
    model.eval()


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.adapters.state_dict().items()}


def test_activate_freeze_keeps_frozen_experts_and_old_routers_bit_identical(tiny_backbone):
    model = _model(tiny_backbone)
    assert model.add_task() == 0
    _train(model, 0, steps=3, seed=0)
    usage = {k: a.pool.usage.clone() for k, a in model.adapters.items()}
    assert all(int(u.sum()) > 0 for u in usage.values())  # image samples and class prompts were both counted
    summary = model.end_task()
    for key, adapter in model.adapters.items():
        most_used = set(torch.argsort(usage[key], descending=True, stable=True)[:2].tolist())
        assert set(summary["frozen"][key]) == most_used == set(adapter.pool.frozen.nonzero().flatten().tolist())
        assert not adapter.pool.usage.any()
    assert model.add_task() == 1
    before = _snapshot(model)
    trainable = {id(p) for p in model.trainable_parameters(1)}
    assert all(id(p) not in trainable for p in model.adapters["image_0"].routers[0].parameters())
    for adapter in model.adapters.values():  # frozen experts never reach the optimizer (weight decay would move them)
        for e in adapter.pool.frozen.nonzero().flatten().tolist():
            assert all(id(p) not in trainable for p in adapter.pool.experts[e].parameters())
    _train(model, 1, steps=3, seed=1)
    after = _snapshot(model)
    for key, adapter in model.adapters.items():
        for e in range(adapter.num_experts):
            changed = any(
                not torch.equal(before[name], after[name])
                for name in before
                if name.startswith(f"{key}.pool.experts.{e}.")
            )
            assert changed != bool(adapter.pool.frozen[e]), (key, e)
        assert torch.equal(before[f"{key}.routers.0.w_gate"], after[f"{key}.routers.0.w_gate"])
        assert not torch.equal(before[f"{key}.routers.1.w_gate"], after[f"{key}.routers.1.w_gate"])


def test_state_round_trip_restores_frozen_mask_and_usage(tiny_clip_dir, tiny_backbone):
    model = _model(tiny_backbone)
    model.add_task()
    _train(model, 0, steps=1, seed=0)
    model.end_task()
    model.add_task()
    _train(model, 1, steps=1, seed=1)
    other = _model(CLIPBackbone.from_pretrained(str(tiny_clip_dir)))
    other.add_task(), other.add_task()
    other.adapters.load_state_dict(model.adapters.state_dict())
    for key, adapter in model.adapters.items():
        restored = other.adapters[key].pool
        assert torch.equal(restored.frozen, adapter.pool.frozen) and torch.equal(restored.usage, adapter.pool.usage)
        assert restored.usage.any()
        frozen = adapter.pool.frozen.nonzero().flatten().tolist()
        assert all(not p.requires_grad for e in frozen for p in restored.experts[e].parameters())


def test_mixed_per_sample_tasks_equal_running_each_sample_alone(tiny_backbone):
    model = _model(tiny_backbone)
    model.add_task(), model.add_task()
    torch.manual_seed(0)
    with torch.no_grad():
        for adapter in model.adapters.values():
            for expert in adapter.pool.experts:
                expert.up.weight.normal_()
            for router in adapter.routers:
                router.w_gate.normal_()
    pixels = torch.randn(5, 3, 32, 32)
    tasks = torch.tensor([1, -1, 0, 1, 0])
    tokens = model.tokenize(PROMPTS + ["a b", "c"])
    with torch.no_grad():
        mixed_image = model.encode_image(pixels, task=tasks)
        mixed_text = model.encode_text(tokens, task=tasks)
        for b, t in enumerate(tasks.tolist()):
            single = None if t < 0 else t
            alone = model.encode_image(pixels[b : b + 1], task=single)
            torch.testing.assert_close(mixed_image[b : b + 1], alone, rtol=1e-5, atol=1e-6)
            text_alone = model.encode_text({k: v[b : b + 1] for k, v in tokens.items()}, task=single)
            torch.testing.assert_close(mixed_text[b : b + 1], text_alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mixed_image[0], model.encode_image(pixels[:1]).squeeze(0).detach())


def test_save_and_load_adapters(tmp_path, tiny_clip_dir, tiny_backbone):
    model = _model(tiny_backbone)
    model.add_task(), model.add_task()
    _train(model, 1, steps=2, seed=0)
    model.end_task()
    out = model.save_adapters(tmp_path / "adapters")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["num_tasks"] == 2 and config["moe"]["num_experts"] == 4
    pixels, tokens = torch.randn(2, 3, 32, 32), model.tokenize(PROMPTS)

    def logits(m):
        with torch.no_grad():
            return m.encode_image(pixels, task=1) @ m.encode_text(tokens, task=1).t()

    loaded = _model(CLIPBackbone.from_pretrained(str(tiny_clip_dir)))
    loaded.load_adapters(out)
    assert loaded.num_tasks == 2
    assert torch.equal(logits(loaded), logits(model))
    for key, adapter in model.adapters.items():
        assert torch.equal(loaded.adapters[key].pool.frozen, adapter.pool.frozen)

    with pytest.raises(ValueError, match="moe.num_experts differs: saved 4, this model 3"):
        _model(CLIPBackbone.from_pretrained(str(tiny_clip_dir)), num_experts=3).load_adapters(out)


def test_loading_onto_another_architecture_names_the_field(tmp_path, tiny_backbone):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from moecl.backbone.tiny import write_tiny_clip

    model = _model(tiny_backbone)
    model.add_task()
    out = model.save_adapters(tmp_path / "adapters")
    wide_dir = write_tiny_clip(tmp_path / "wide", hidden=48)
    wide = _model(CLIPBackbone.from_pretrained(str(wide_dir)))
    wide.backbone.name = tiny_backbone.name  # only the width differs
    with pytest.raises(ValueError, match="architecture.image_hidden differs: saved 32, this model 48"):
        wide.load_adapters(out)
    with pytest.raises(ValueError, match="missing"):
        model.load_adapters(tmp_path / "nowhere")


def test_tasks_context_and_single_router(tiny_backbone):
    model = _model(tiny_backbone, single_router=True)
    assert [model.add_task() for _ in range(3)] == [0, 0, 0]
    assert model.num_tasks == 1
    adapter = model.adapters["text_0"]
    with model.task(0):
        assert adapter.selection == 0
        with model.task([0, -1]):
            assert adapter.selection.tolist() == [0, -1]
        assert adapter.selection == 0
    assert adapter.selection is None
    with pytest.raises(ValueError, match="task 1 out of range"):
        model.encode_text(model.tokenize(["a"]), task=1)
    with pytest.raises(ValueError, match=r"task ids must be in \[-1, 0\]"):
        model.encode_text(model.tokenize(["a"]), task=torch.tensor([2]))


def test_train_mode_parameter_counts_and_aux_loss(tiny_backbone):
    model = _model(tiny_backbone, load_balance_weight=0.01)
    model.add_task()
    model.train()
    assert not tiny_backbone.model.training and all(a.training for a in model.adapters.values())
    counts = parameter_counts(ParameterParts(model, tuple(model.adapters.parameters())))
    expert, router = 2 * 32 * 64 + 64 + 32, 2 * 32 * 4
    assert counts["moe"] == 4 * (4 * expert + router)
    assert counts["per_tower"] == {"image": 2 * (4 * expert + router), "text": 2 * (4 * expert + router)}
    assert counts["trainable"] == counts["moe"]
    clip = sum(p.numel() for name, p in tiny_backbone.named_parameters() if ".adapter." not in name)
    assert counts["total"] == counts["moe"] + clip
    assert sum(p.numel() for p in model.trainable_parameters(0)) == counts["moe"]
    model.encode_text(model.tokenize(PROMPTS), task=0)
    aux = model.aux_loss()
    assert aux.requires_grad and aux.item() >= 0
    assert model.aux_loss().item() == 0


def test_eval_noise_is_seeded_per_evaluation_by_the_model(tiny_backbone):
    model = _model(tiny_backbone, eval_noise=True)
    model.add_task()
    _train(model, 0, 3, seed=0)
    with torch.no_grad():
        for adapter in model.adapters.values():  # noise large enough to move the gates
            adapter.routers[0].w_noise.fill_(1.0)
    pixels = torch.randn(4, 3, 32, 32)
    outputs = []
    for seed in (1, 1, 2):
        model.seed_eval_noise(seed)
        with torch.no_grad():
            outputs.append(model.encode_image(pixels, task=0))
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])
    for adapter in model.adapters.values():  # moe.eval_noise off (our default): the same weights, no noise
        adapter.routers[0].eval_noise = False
    with torch.no_grad():
        quiet = model.encode_image(pixels, task=0)
        assert torch.equal(model.encode_image(pixels, task=0), quiet) and not torch.equal(quiet, outputs[0])
