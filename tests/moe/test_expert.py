import torch

from moecl.moe.expert import Expert


def test_parameter_counts_match_method():
    assert sum(p.numel() for p in Expert(768).parameters()) == 99_136
    assert sum(p.numel() for p in Expert(512).parameters()) == 66_112


def test_starts_at_zero_and_scales_output():
    expert = Expert(16, bottleneck=8)
    x = torch.randn(2, 5, 16)
    assert torch.equal(expert(x), torch.zeros(2, 5, 16))
    assert expert.down.weight.abs().sum() > 0
    torch.nn.init.normal_(expert.up.weight)
    expert.eval()
    unscaled = expert.up(torch.relu(expert.down(x)))
    torch.testing.assert_close(expert(x), unscaled * 0.1)


def test_dropout_only_in_training():
    expert = Expert(16, bottleneck=64, dropout=0.5)
    torch.nn.init.normal_(expert.up.weight)
    x = torch.randn(4, 16)
    expert.eval()
    assert torch.equal(expert(x), expert(x))
    expert.train()
    torch.manual_seed(0)
    assert not torch.equal(expert(x), expert(x))
