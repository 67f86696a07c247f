"""Mixture-of-Experts adapters: experts, noisy top-k routers, activate-freeze, injection into a backbone."""

from moecl.moe.expert import Expert
from moecl.moe.inject import inject_moe_adapters, iter_moe_adapters
from moecl.moe.layer import MoEAdapter
from moecl.moe.model import MoEAdapterModel
from moecl.moe.pool import ExpertPool
from moecl.moe.router import Router, load_balancing_loss

__all__ = [
    "Expert",
    "ExpertPool",
    "MoEAdapter",
    "MoEAdapterModel",
    "Router",
    "inject_moe_adapters",
    "iter_moe_adapters",
    "load_balancing_loss",
]
