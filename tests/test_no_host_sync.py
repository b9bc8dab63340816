"""A training step must not make the host wait for the device: on a GPU each hidden synchronisation
stalls the queue of launches that keeps the device busy.

The probe runs real ``Loader.prepare`` + ``Trainer.train_step`` calls on the CPU and flags what
synchronises on CUDA: operations whose output size depends on the data (``nonzero``, a boolean
mask's ``index``/``index_put_``, ``masked_select``, ``unique``), reading a value on the host
(``_local_scalar_dense``: ``item``, ``float``, ``bool``, ``int``), and tensors made on the host
inside the step: from Python data (``torch.tensor``, ``torch.as_tensor``; with ``device=`` a
pageable host-to-device copy, without it a host tensor the step must copy over) or by a factory
given no device (``torch.randn(b, n)`` indexing a device tensor). The first step is not probed
(optimizer state and cached constants are made once), nor the trainer's intended host vote
(``train.vote: host``, which objectives with after-step state need).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mmcl.models  # noqa: F401  (registers the built-in models and objectives)
import mmcl.objectives  # noqa: F401
from mmcl.errors import DataError
from mmcl.recipe import load_recipe
from mmcl.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
SYNC_OPS = {"nonzero", "_local_scalar_dense", "masked_select", "masked_scatter", "unique", "_unique2",
            "unique_dim", "unique_consecutive", "repeat_interleave"}
HOST_FACTORIES = ("randn", "rand", "randint", "randperm", "arange", "empty", "zeros", "ones", "full", "linspace")


class SyncProbe(TorchDispatchMode):
    """Counts, by name, the operations and host tensors described in the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[str] = Counter()
        self.active = False

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if self.active:
            name = func.overloadpacket.__name__
            if name in SYNC_OPS:
                self.seen[name] += 1
            if name in ("index", "index_put", "index_put_") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])):
                self.seen[f"{name}[bool mask]"] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        active, self.active = self.active, False
        try:
            yield
        finally:
            self.active = active


def watch_factories(probe: SyncProbe, monkeypatch: pytest.MonkeyPatch) -> None:
    """Wrap torch's tensor factories so that the probe sees tensors made on the host."""
    for fname in ("tensor", "as_tensor"):
        def from_data(data: Any, *a: Any, _orig: Any = getattr(torch, fname), _n: str = fname, **kw: Any) -> Any:
            if probe.active and not isinstance(data, torch.Tensor):
                probe.seen[f"torch.{_n}(python data)"] += 1
            return _orig(data, *a, **kw)
        monkeypatch.setattr(torch, fname, from_data)
    for fname in HOST_FACTORIES:
        def factory(*a: Any, _orig: Any = getattr(torch, fname), _n: str = fname, **kw: Any) -> Any:
            if probe.active and kw.get("device") is None:
                probe.seen[f"torch.{_n}(no device)"] += 1
            return _orig(*a, **kw)
        monkeypatch.setattr(torch, fname, factory)


def probe_steps(digits_dir: Path, out: Path, monkeypatch: pytest.MonkeyPatch, config: str,
                *extra: str, steps: int = 3) -> tuple[Trainer, Counter[str]]:
    """``steps`` optimizer steps of a tiny run of ``config``; what the probe saw after the first."""
    trainer = Trainer(load_recipe(ROOT / "configs" / config, [
        f"data.train_shards={digits_dir}/train-{{000000..000004}}.tar", f"run.output_dir={out}",
        "data.batch_size=16", "data.num_workers=0", "data.shuffle_buffer=20", "data.normalize=device",
        "train.steps=100", "train.log_every=1000", "train.progress=false", "train.trackers=[]",
        "optim.fused=true", "optim.warmup_steps=2", "eval.zeroshot_shards=null", *extra]))
    probe = SyncProbe()
    watch_factories(probe, monkeypatch)
    votes = trainer._votes

    def host_vote(*flags: Any) -> list[bool]:  # train.vote: host synchronises on purpose
        with probe.paused():
            return votes(*flags)
    monkeypatch.setattr(trainer, "_votes", host_vote)
    trainer.loader.set_epoch(0)
    batches = iter(trainer.loader)
    for step in range(steps):
        batch = next(batches)
        with probe if step else contextlib.nullcontext():
            probe.active = step > 0
            assert trainer.train_step(trainer.loader.prepare(batch, trainer.acc.device)) is True
            probe.active = False
    return trainer, probe.seen


def gpu_check_cases() -> dict[str, tuple[str, ...]]:
    """The cases of ``benchmarks/sync_check.py`` (torch's sync debugger on a GPU), one list for both;
    but the JPEG one, whose shards and GPU decoder the GPU check has."""
    spec = importlib.util.spec_from_file_location("sync_check", ROOT / "benchmarks" / "sync_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {name: case for name, case in module.CASES.items() if "data.decode=device" not in case}


CASES = gpu_check_cases()


@pytest.mark.parametrize("case", list(CASES))
def test_a_training_step_does_not_wait_for_the_device(digits_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    config, *extra = CASES[case]
    trainer, seen = probe_steps(digits_dir, tmp_path, monkeypatch, config, *extra)
    # the host vote: state after each step, or LARS (no fused kernel to skip a step on the device)
    assert trainer.vote_on_device == (case not in ("byol", "mocov3", "dino", "swav", "byol lars"))
    assert not seen, f"{case}: host synchronisations in a training step: {dict(seen)}"


@pytest.mark.parametrize("name", ["instdisc nce", "instdisc softmax", "cmc bank"])
def test_a_memory_bank_step_does_not_wait_for_the_device(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The memory bank's objectives called as the trainer calls them (CMC's bank mode has no digits case
    above: it needs multi-field shards): drawing negatives, scoring, NCE's normaliser once set, the
    update of a batch with a repeated id and an id outside the bank (checked later, by ``check_ids``)."""
    from mmcl.objectives.cmc import CMCConfig, CMCLoss
    from mmcl.objectives.instdisc import InstDiscConfig, InstDiscLoss

    torch.manual_seed(0)
    if name.startswith("instdisc"):
        objective, views = InstDiscLoss(InstDiscConfig(bank_size=40, negatives=8, loss=name.split()[1])), 1
    else:
        objective, views = CMCLoss(CMCConfig(negatives="bank", bank_size=40, bank_negatives=8)), 2
    objective.setup(type("M", (), {"embed_dim": 6, "backbones": [0, 1]})(), 10)
    probe = SyncProbe()
    watch_factories(probe, monkeypatch)
    for step, ids in enumerate(([0, 1, 2, 3], [4, 5, 5, 41], [30, 31, 32, 1])):
        batch, z = {"id": torch.as_tensor(ids)}, [torch.randn(4, 6, requires_grad=True) for _ in range(views)]
        with probe if step else contextlib.nullcontext():
            probe.active = step > 0
            loss, _ = objective({"z": z}, batch)
            loss.backward()
            probe.active = False
    assert not probe.seen, f"{name}: host synchronisations in a step: {dict(probe.seen)}"
    banks = [objective.bank] if views == 1 else list(objective.banks)
    with pytest.raises(DataError, match="sample ids range 0..41 but the memory bank has 40 rows"):
        banks[0].check_ids()


@pytest.mark.parametrize("exclude_first_token", [True, False])
@pytest.mark.parametrize("prob", [0.1, 0.5, 0.75])
def test_the_device_patch_dropout_is_open_clips(prob: float, exclude_first_token: bool) -> None:
    """mmcl's patch dropout (drawn on the tokens' device) keeps what open_clip's keeps: on the CPU, from
    the same seed, the same tokens and gradients; it replaces open_clip's in a CLIP model's image tower
    and leaves the state dict as open_clip's model has it."""
    from open_clip.model import CustomTextCLIP
    from open_clip.transformer import PatchDropout as OpenClipPatchDropout

    from mmcl.models.clip import ClipModel, ClipModelConfig, PatchDropout

    x = torch.randn(5, 17, 8, requires_grad=True)
    results = []
    for module in (OpenClipPatchDropout(prob, exclude_first_token), PatchDropout(prob, exclude_first_token)):
        torch.manual_seed(1)
        y = module(x)
        (grad,) = torch.autograd.grad((y * torch.arange(y.numel()).reshape(y.shape)).sum(), x)
        results.append((y, grad))
        assert torch.equal(module.eval()(x), x)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    model = ClipModel.from_config(ClipModelConfig(open_clip_config="mmcl-tiny-vit", patch_dropout=prob))
    assert type(model.clip.visual.patch_dropout) is PatchDropout
    assert model.clip.visual.patch_dropout.prob == prob
    assert list(model.clip.state_dict()) == list(CustomTextCLIP(**model.model_cfg).state_dict())
