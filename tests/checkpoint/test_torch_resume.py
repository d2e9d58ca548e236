"""
PyTorch: training interrupted and resumed from a checkpoint is bit-identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kelpie_sdk.checkpoint import Checkpointer

TOTAL = 20
SPLIT = 8


def _build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Generator]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(32, 4),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(99)
    return model, optimizer, data


def _train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: torch.Generator
) -> None:
    x = torch.randn(8, 16, generator=data)
    y = torch.randn(8, 4, generator=data)
    optimizer.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()


def _state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: torch.Generator
) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "data": data.get_state(),
    }


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    """N steps straight equal k steps, a restart from the checkpoint, and N-k more."""
    model, optimizer, data = _build(seed=0)
    for _ in range(TOTAL):
        _train_step(model, optimizer, data)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    url = f"file://{tmp_path}/ckpt"
    model, optimizer, data = _build(seed=0)
    ckpt = Checkpointer(url, every_steps=4)
    for step in range(SPLIT):
        _train_step(model, optimizer, data)
        if ckpt.should_save(step + 1):
            ckpt.save(_state(model, optimizer, data), step=step + 1)
    ckpt.close()
    # The interruption: everything is rebuilt from other seeds, then restored.
    model, optimizer, data = _build(seed=1)
    torch.manual_seed(12345)
    ckpt = Checkpointer(url, every_steps=4)
    start = ckpt.latest_step()
    assert SPLIT == start
    state = ckpt.load()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    data.set_state(state["data"])
    for step in range(start, TOTAL):
        _train_step(model, optimizer, data)
        if ckpt.should_save(step + 1):
            ckpt.save(_state(model, optimizer, data), step=step + 1)
    ckpt.close()
    resumed = model.state_dict()
    assert straight.keys() == resumed.keys()
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key
    assert [4, 8, 12, 16, 20] == Checkpointer(url).steps()
