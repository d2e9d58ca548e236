"""
PyTorch on a CUDA device: tensors come back on their device, bit for bit, and an
asynchronous save is a snapshot of the moment it was called.

These need a GPU. The CI machines have none, so this module is skipped there;
it is run on a lent GPU machine (see docs/checkpointing.md, "GPUs").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)"
)

from kelpie_sdk.checkpoint import Checkpointer  # noqa: E402

TOTAL = 30
SPLIT = 12


def _build(seed: int) -> tuple[Any, Any, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(256, 8),
    ).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    return model, optimizer, scheduler


def _step(model: Any, optimizer: Any, scheduler: Any, gen: Any) -> None:
    x = torch.randn(32, 64, device="cuda", generator=gen)
    y = torch.randn(32, 8, device="cuda", generator=gen)
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
    scheduler.step()


def _state(model: Any, optimizer: Any, scheduler: Any, gen: Any) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "cuda_rng": torch.cuda.get_rng_state(),
        "data": gen.get_state(),
    }


@pytest.fixture(autouse=True)
def _deterministic(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def test_cuda_tensors_round_trip_on_their_device(tmp_path: Path) -> None:
    state = {
        "w": torch.randn(1024, 1024, device="cuda"),
        "h": torch.randn(333, device="cuda", dtype=torch.float16),
        "b": torch.arange(10, device="cuda", dtype=torch.bfloat16),
        "cpu": torch.randn(7),
    }
    ckpt = Checkpointer(f"file://{tmp_path}/ckpt")
    ckpt.save(state, step=1)
    ckpt.close()
    back = Checkpointer(f"file://{tmp_path}/ckpt").load()
    for key, value in state.items():
        assert value.device == back[key].device, key
        assert value.dtype == back[key].dtype, key
        assert torch.equal(value, back[key]), key
    on_cpu = Checkpointer(f"file://{tmp_path}/ckpt").load(map_location="cpu")
    assert all(t.device.type == "cpu" for t in on_cpu.values())
    assert torch.equal(state["w"].cpu(), on_cpu["w"])


def test_async_save_is_a_snapshot_of_the_call(tmp_path: Path) -> None:
    """Training that changes the tensors in place right after save() does not leak in."""
    weights = torch.randn(4096, 4096, device="cuda")  # 64 MiB
    expected = weights.clone()
    ckpt = Checkpointer(f"file://{tmp_path}/ckpt")
    ckpt.save({"w": weights}, step=1)
    for _ in range(20):
        weights.mul_(1.5).add_(1.0)  # queued on the stream right behind the copy
    ckpt.close()
    back = Checkpointer(f"file://{tmp_path}/ckpt").load()
    assert torch.equal(expected, back["w"])
    assert not torch.equal(weights, back["w"])


def test_training_resumes_bit_identical_on_the_gpu(tmp_path: Path) -> None:
    model, optimizer, scheduler = _build(0)
    gen = torch.Generator(device="cuda").manual_seed(7)
    for _ in range(TOTAL):
        _step(model, optimizer, scheduler, gen)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    url = f"file://{tmp_path}/ckpt"
    model, optimizer, scheduler = _build(0)
    gen = torch.Generator(device="cuda").manual_seed(7)
    ckpt = Checkpointer(url, every_steps=4)
    for step in range(SPLIT):
        _step(model, optimizer, scheduler, gen)
        if ckpt.should_save(step + 1):
            ckpt.save(_state(model, optimizer, scheduler, gen), step=step + 1)
    ckpt.close()

    model, optimizer, scheduler = _build(1)
    gen = torch.Generator(device="cuda").manual_seed(999)
    ckpt = Checkpointer(url, every_steps=4)
    start = ckpt.latest_step()
    assert SPLIT == start
    state = ckpt.load()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.cuda.set_rng_state(state["cuda_rng"])
    gen.set_state(state["data"])
    for _ in range(start, TOTAL):
        _step(model, optimizer, scheduler, gen)
    ckpt.close()
    for key, value in straight.items():
        assert torch.equal(value, model.state_dict()[key]), key
