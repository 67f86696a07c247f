import time

import torch

from moecl.backbone.clip import CLIPBackbone
from moecl.config import BackboneConfig, MoEConfig, RunConfig, SelectorConfig
from moecl.moe.model import MoEAdapterModel
from moecl.params import count_parameters

CLIP_B16 = 149_620_737


def test_paper_mtil_and_cil_counts():
    mtil = count_parameters(RunConfig(selector=SelectorConfig(features="alexnet")), num_tasks=11)
    assert mtil["moe"] == 51_059_712
    assert mtil["selector"] == 12 * 8_696_164  # 11 task autoencoders + the reference one, 43,264 -> 100 -> 43,264
    assert mtil["trainable"] == mtil["moe"] + mtil["selector"]
    assert mtil["total"] == CLIP_B16 + mtil["trainable"]
    assert mtil["per_tower"] == {"image": 26_171_904 + 4_460_544, "text": 17_453_568 + 2_973_696}
    cil = count_parameters(RunConfig(moe=MoEConfig(num_experts=2, single_router=True)), num_tasks=10)
    assert cil["moe"] == 4_027_392 and cil["selector"] == 0
    own = count_parameters(RunConfig(selector=SelectorConfig(reference=None)), num_tasks=2)
    assert own["selector"] == 2 * (512 * 100 + 100 + 100 * 512 + 512)  # ViT-B/16's 512-d embedding, no reference AE


def test_one_training_step_of_full_size_vit_b16_changes_only_adapters():
    start = time.perf_counter()
    torch.manual_seed(0)
    backbone = CLIPBackbone.from_config(BackboneConfig(), pretrained=False)
    model = MoEAdapterModel(backbone, MoEConfig())
    model.add_task()
    frozen_before = {n: p.detach().clone() for n, p in backbone.named_parameters() if ".adapter." not in n}
    adapters_before = {n: p.detach().clone() for n, p in model.adapters.named_parameters()}
    optimizer = torch.optim.AdamW(model.trainable_parameters(0), lr=1e-3)
    model.train()
    tokens = {"input_ids": torch.tensor([[49406, 320, 1125, 49407], [49406, 320, 2368, 49407]])}
    tokens["attention_mask"] = torch.ones_like(tokens["input_ids"])
    logits = model.logit_scale * model.encode_image(torch.randn(2, 3, 224, 224), 0) @ model.encode_text(tokens, 0).t()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    optimizer.step()
    assert all(torch.equal(p, frozen_before[n]) for n, p in backbone.named_parameters() if n in frozen_before)
    changed = [n for n, p in model.adapters.named_parameters() if not torch.equal(p, adapters_before[n])]
    assert changed and all(".pool.experts." in n or ".routers.0." in n for n in changed)
    assert time.perf_counter() - start < 60
