"""InvaSpread, InstDisc, CMC and CPC against independent plain-Python reference computations; the
memory bank's updates and sampling; CPC's patch grid and causality; colour-space conversions."""

from __future__ import annotations

import contextlib
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from mmcl.data.transforms import build_transform, rgb_to_ycbcr, srgb_to_lab
from mmcl.errors import DataError
from mmcl.models.cpc import CPCModel, CPCModelConfig, jittered_patch_grid, patch_grid, rotate_patches
from mmcl.objectives.bank import MemoryBank, bank_logits, nce_loss
from mmcl.objectives.cmc import CMCConfig, CMCLoss, view_pairs
from mmcl.objectives.cpc import CPCConfig, CPCLoss
from mmcl.objectives.instdisc import InstDiscConfig, InstDiscLoss
from mmcl.objectives.invaspread import invaspread_loss
from mmcl.objectives.simclr import pair_logits
from mmcl.objectives.swav import SwAVConfig, SwAVLoss

from . import dot, unit

torch.manual_seed(0)


def test_invaspread_matches_the_definition_and_splits_over_processes() -> None:
    z1, z2, tau = unit(4, 3), unit(4, 3), 0.2
    feats = list(z1) + list(z2)
    n = len(feats)
    ref = 0.0
    for r, f in enumerate(feats):
        pos = (r + n // 2) % n
        denom = sum(math.exp(dot(g, f) / tau) for c, g in enumerate(feats) if c != r)
        prob = [math.exp(dot(g, f) / tau) / denom for g in feats]
        ref += -math.log(prob[pos]) - sum(math.log(1 - prob[c]) for c in range(n) if c not in (r, pos))
    loss = invaspread_loss(*pair_logits(z1, z2, z1, z2, tau, 0))
    assert loss.item() == pytest.approx(ref / n, rel=1e-6)
    split = [invaspread_loss(*pair_logits(z1[k * 2:(k + 1) * 2], z2[k * 2:(k + 1) * 2], z1, z2, tau, k))
             for k in (0, 1)]
    assert (sum(split) / 2).item() == pytest.approx(loss.item(), rel=1e-6)


def test_nce_and_softmax_nce_match_the_definitions() -> None:
    v, rows, tau = unit(3, 4), unit(10, 4), 0.5
    ids, neg = torch.tensor([1, 4, 9]), torch.tensor([[0, 2], [3, 3], [9, 5]])
    logits = bank_logits(v, rows, ids, neg, tau).double()
    log_z, n, k = torch.tensor(1.3, dtype=torch.float64), 10, 2
    ref = 0.0
    for b in range(3):
        h = lambda j: (math.exp(dot(v[b], rows[j]) / tau - 1.3)) / (math.exp(dot(v[b], rows[j]) / tau - 1.3) + k / n)  # noqa: E731,B023
        ref += -math.log(h(int(ids[b]))) - sum(math.log(1 - h(int(j))) for j in neg[b])
    assert nce_loss(logits, log_z, n).item() == pytest.approx(ref / 3, rel=1e-5)
    soft = F.cross_entropy(logits, torch.zeros(3, dtype=torch.long)).item()
    ref_soft = sum(-math.log(math.exp(dot(v[b], rows[ids[b]]) / tau) /
                             (math.exp(dot(v[b], rows[ids[b]]) / tau) + sum(math.exp(dot(v[b], rows[j]) / tau)
                                                                            for j in neg[b]))) for b in range(3)) / 3
    assert soft == pytest.approx(ref_soft, rel=1e-5)


def test_memory_bank_updates_samples_and_checks_ids() -> None:
    bank = MemoryBank(8, 3, momentum=0.5)
    before = bank.rows.clone()
    assert bank.sample(2, 5).max() < 8  # nothing filled yet: any row
    v = torch.tensor([[3.0, 0, 0], [0, 0, -2.0]])
    bank.update(torch.tensor([1, 6]), v)
    for i, row in zip((1, 6), F.normalize(v, dim=1)):
        expected = F.normalize(0.5 * before[i] + 0.5 * row, dim=0)
        assert torch.allclose(bank.rows[i], expected, atol=1e-6)
    untouched = [0, 2, 3, 4, 5, 7]
    assert torch.equal(bank.rows[untouched], before[untouched])
    assert bank.seen.nonzero().squeeze(1).tolist() == [1, 6]
    assert set(bank.sample(50, 2).unique().tolist()) == {1, 6}  # only filled rows once k of them are
    with pytest.raises(DataError, match="bank_size"):
        bank.check_ids(torch.tensor([2, 8]))


class _OtherWinner(TorchDispatchMode):
    """``index_put_`` with its indices and values reversed: where an index repeats, another occurrence
    wins, as CUDA may let any of them."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func.overloadpacket.__name__ in ("index_put", "index_put_") and args[1][0].dtype == torch.long:
            values = args[2] if args[2].dim() == 0 else args[2].flip(0)
            args = (args[0], [args[1][0].flip(0), *args[1][1:]], values, *args[3:])
        return func(*args, **(kwargs or {}))


def test_memory_bank_update_of_a_repeated_id_is_its_last_occurrence_whichever_write_wins() -> None:
    """Banks must stay identical on every process and device: a repeated id takes its last update."""
    ids, v = torch.tensor([2, 5, 2, 7, 2, 5]), torch.randn(6, 3)
    banks = []
    for mode in (contextlib.nullcontext(), _OtherWinner()):
        torch.manual_seed(0)
        bank = MemoryBank(8, 3, momentum=0.5)
        before = bank.rows.clone()
        with mode:
            bank.update(ids, v)
        banks.append(bank.rows)
    for i, last in ((2, 4), (5, 5), (7, 3)):
        expected = F.normalize(0.5 * before[i] + 0.5 * F.normalize(v[last], dim=0), dim=0)
        assert torch.allclose(banks[0][i], expected, atol=1e-6)
    assert torch.equal(banks[0], banks[1])


def _update_by_scatter(bank: MemoryBank, ids: torch.Tensor, feats: torch.Tensor) -> None:
    """The bank's update until 2026-11: each id's last position from a bank-sized ``scatter_reduce``."""
    feats = F.normalize(feats.float(), dim=1)
    mixed = bank.momentum * bank.rows[ids] + (1.0 - bank.momentum) * feats
    last = torch.full(bank.seen.shape, -1, dtype=torch.long)
    last.scatter_reduce_(0, ids, torch.arange(ids.shape[0]), "amax")
    bank.rows[ids] = F.normalize(mixed, dim=1)[last[ids]]
    bank.seen[ids] = True


def test_memory_bank_update_by_sorted_ids_is_the_bank_sized_one_exactly() -> None:
    """The last occurrence of each id, found by a stable sort of the batch (O(batch)), writes exactly
    what the bank-sized scatter wrote, over steps of batches full of repeats."""
    torch.manual_seed(3)
    ours, theirs = MemoryBank(50, 6, momentum=0.3), MemoryBank(50, 6, momentum=0.3)
    theirs.load_state_dict(ours.state_dict())
    for _ in range(5):
        ids, v = torch.randint(50, (40,)), torch.randn(40, 6)
        ours.update(ids, v)
        _update_by_scatter(theirs, ids, v)
        assert torch.equal(ours.rows, theirs.rows) and torch.equal(ours.seen, theirs.seen)


def test_memory_bank_draws_uniformly_among_the_filled_rows_and_again_after_a_load() -> None:
    """Negatives: any row while fewer than k are filled, then only filled rows, each as often (about);
    the draws follow the draw count, which a state dict (a checkpoint) restores."""
    torch.manual_seed(4)
    bank = MemoryBank(1000, 3)
    assert bank.sample(200, 50).unique().numel() > 990  # 10^4 draws over 1000 rows, none filled
    filled = torch.randperm(1000)[:37]
    bank.update(filled, torch.randn(37, 3))
    assert bank.sample(1, 38).unique().numel() > 37  # 37 filled rows, 38 negatives: from any row
    state = {k: v.clone() for k, v in bank.state_dict().items()}
    idx = bank.sample(1000, 37)
    counts = torch.bincount(idx.flatten(), minlength=1000)
    assert set(counts.nonzero().squeeze(1).tolist()) == set(filled.tolist())
    assert counts[filled].min() > 850 and counts[filled].max() < 1150  # 1000 expected each; σ ≈ 31
    again = MemoryBank(1000, 3)
    again.load_state_dict(state)
    assert torch.equal(again.sample(1000, 37), idx) and not torch.equal(bank.sample(1000, 37), idx)


def test_memory_bank_clamps_ids_outside_it_and_reports_them_at_the_check() -> None:
    """An id outside the bank (a data mistake) is not checked in the step: it indexes the bank clamped
    (no device-side assert, no wrap-around for -1) and ``check_ids()`` reports the range of the ids the
    updates met since the last check, once."""
    bank = MemoryBank(8, 3)
    bank.update(torch.tensor([1, 2]), torch.randn(2, 3))
    bank.check_ids()  # all in range
    bank.update(torch.tensor([3, 9]), torch.randn(2, 3))
    bank.update(torch.tensor([-1, 4]), torch.randn(2, 3))
    assert torch.equal(bank.clamp(torch.tensor([-1, 3, 9])), torch.tensor([0, 3, 7]))
    assert bank.seen.nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 4, 7]
    with pytest.raises(DataError, match=r"^sample ids range -1\.\.9 but the memory bank has 8 rows: set "
                                        r"objective\.bank_size above the largest training id"):
        bank.check_ids()
    bank.check_ids()  # reported once


def test_the_objective_checks_the_ids_its_banks_met_where_the_trainer_asks() -> None:
    """``Objective.check_deferred`` (called by the trainer at logging windows and checkpoints) reaches
    every bank: CMC's, kept in a list, and those of a combined objective's parts."""
    cmc = CMCLoss(CMCConfig(negatives="bank", bank_size=6, bank_negatives=3, temperature=0.5))
    cmc.setup(type("M", (), {"embed_dim": 4, "backbones": [0, 1]})(), 10)
    z = [F.normalize(torch.randn(2, 4), dim=-1) for _ in range(2)]
    cmc({"z": z}, {"id": torch.tensor([0, 1])})
    cmc.check_deferred()  # in range
    cmc({"z": z}, {"id": torch.tensor([0, 7])})
    with pytest.raises(DataError, match=r"^sample ids range 0\.\.7 but the memory bank has 6 rows"):
        cmc.check_deferred()
    holder = torch.nn.Module()  # a part's bank one module further down is found as well
    holder.inner = InstDiscLoss(InstDiscConfig(bank_size=4, negatives=2, temperature=0.1))
    holder.inner.setup(type("M", (), {"embed_dim": 4})(), 10)
    holder.inner.bank.update(torch.tensor([5]), torch.randn(1, 4))
    outer = InstDiscLoss(InstDiscConfig(bank_size=4, negatives=2, temperature=0.1))
    outer.parts = torch.nn.ModuleList([holder])
    with pytest.raises(DataError, match=r"^sample ids range 5\.\.5 but the memory bank has 4 rows"):
        outer.check_deferred()


def test_instdisc_estimates_z_once_and_updates_the_bank() -> None:
    loss_fn = InstDiscLoss(InstDiscConfig(bank_size=16, negatives=4, temperature=0.1))
    loss_fn.setup(type("M", (), {"embed_dim": 5})(), 10)
    z = torch.randn(3, 5, requires_grad=True)
    batch = {"id": torch.tensor([0, 7, 15])}
    loss, _ = loss_fn({"z": [z]}, batch)
    loss.backward()
    assert z.grad.abs().sum() > 0 and torch.isfinite(loss_fn.log_z)
    log_z = loss_fn.log_z.item()
    loss_fn({"z": [torch.randn(3, 5)]}, batch)
    assert loss_fn.log_z.item() == log_z
    assert loss_fn.bank.seen.nonzero().squeeze(1).tolist() == [0, 7, 15]
    # whether Z is set is kept on the host (no step reads the buffer), and follows a checkpoint's load
    resumed = InstDiscLoss(InstDiscConfig(bank_size=16, negatives=4, temperature=0.1))
    resumed.setup(type("M", (), {"embed_dim": 5})(), 10)
    resumed({"z": [torch.randn(3, 5)]}, batch)  # estimates its own Z
    resumed.load_state_dict(loss_fn.state_dict())
    resumed({"z": [torch.randn(3, 5)]}, batch)
    assert resumed.log_z.item() == log_z
    resumed.load_state_dict({**loss_fn.state_dict(), "log_z": torch.tensor(float("nan"))})
    resumed({"z": [z.detach()]}, batch)
    assert torch.isfinite(resumed.log_z) and resumed.log_z.item() != log_z  # estimated again


def test_host_copies_of_buffers_pickle_and_are_read_again_after_a_load() -> None:
    """InstDisc (whether Z is set; its bank's draw count) and SwAV (the step; the queue being full)
    keep host copies of buffers, reset by load hooks: a pickled copy keeps the hooks (no lambdas)."""
    inst = InstDiscLoss(InstDiscConfig(bank_size=16, negatives=4, temperature=0.1))
    inst.setup(type("M", (), {"embed_dim": 5})(), 10)
    inst({"z": [torch.randn(3, 5)]}, {"id": torch.tensor([0, 7, 15])})
    copy = pickle.loads(pickle.dumps(inst))
    assert copy._z_known is True and copy.bank._host_draws is not None
    copy.load_state_dict(inst.state_dict())
    assert copy._z_known is None and copy.bank._host_draws is None
    swav = SwAVLoss(SwAVConfig(prototypes=6, temperature=0.2))
    swav.set_step(3)
    swav._queue_full = True
    copy = pickle.loads(pickle.dumps(swav))
    assert copy._host_step == 3 and copy._queue_full
    copy.load_state_dict({**swav.state_dict(), "step": torch.tensor(5)})
    assert copy._host_step is None and not copy._queue_full and copy.current_step() == 5


def test_cmc_batch_loss_matches_the_definition_in_core_and_full_modes() -> None:
    z = [unit(3, 4) for _ in range(3)]
    tau = 0.3

    def l_dir(a: torch.Tensor, b: torch.Tensor) -> float:  # L^{a→b}, batch mean
        return sum(-math.log(math.exp(dot(a[i], b[i]) / tau) / sum(math.exp(dot(a[i], bj) / tau) for bj in b))
                   for i in range(len(a))) / len(a)

    assert view_pairs(3, "core") == [(0, 1), (0, 2)]
    assert view_pairs(3, "full") == [(0, 1), (0, 2), (1, 2)]
    for mode in ("core", "full"):
        loss, _ = CMCLoss(CMCConfig(mode=mode, temperature=tau))({"z": [x * 2 for x in z]}, {})
        ref = sum(l_dir(z[i], z[j]) + l_dir(z[j], z[i]) for i, j in view_pairs(3, mode))
        assert loss.item() == pytest.approx(ref, rel=1e-5), mode


def test_cmc_bank_loss_scores_each_view_against_the_other_views_memory() -> None:
    cmc = CMCLoss(CMCConfig(negatives="bank", bank_size=6, bank_negatives=3, temperature=0.5))
    cmc.setup(type("M", (), {"embed_dim": 4, "backbones": [0, 1]})(), 10)
    rows = [b.rows.clone() for b in cmc.banks]
    z, ids = [unit(2, 4), unit(2, 4)], torch.tensor([1, 4])
    state = {k: v.clone() for k, v in cmc.banks[0].state_dict().items()}
    neg = cmc.banks[0].sample(2, 3)
    cmc.banks[0].load_state_dict(state)  # the draw count as a checkpoint restores it: the loss draws neg again
    loss, _ = cmc({"z": z}, {"id": ids})

    def l_dir(a: torch.Tensor, memory: torch.Tensor) -> float:
        total = 0.0
        for b in range(2):
            pos = math.exp(dot(a[b], memory[ids[b]]) / 0.5)
            total += -math.log(pos / (pos + sum(math.exp(dot(a[b], memory[j]) / 0.5) for j in neg[b])))
        return total / 2

    assert loss.item() == pytest.approx(l_dir(z[0], rows[1]) + l_dir(z[1], rows[0]), rel=1e-5)
    assert not torch.equal(cmc.banks[0].rows[1], rows[0][1]) and torch.equal(cmc.banks[0].rows[0], rows[0][0])


def test_cpc_patch_grid_and_context_causality() -> None:
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    grid = patch_grid(x, 8, 4)
    assert grid.shape == (2, 3, 3, 3, 8, 8)
    assert torch.equal(grid[1, 2, 1], x[1, :, 8:16, 4:12])
    for context in ("conv", "gru"):
        model = CPCModel(CPCModelConfig(context=context, context_dim=8, context_layers=2))
        z = torch.randn(2, 5, 5, model.embed_dim, requires_grad=True)
        c = model.context(z)
        assert c.shape == (2, 5, 5, 8)
        for row in range(5):  # the context of row i never depends on rows below it (its future)
            (grad,) = torch.autograd.grad(c[:, row].sum(), z, retain_graph=True)
            assert grad[:, row + 1:].abs().sum() == 0, (context, row)
            assert grad[:, row].abs().sum() > 0


def test_cpc_patch_augmentation_jitters_and_rotates_each_patch() -> None:
    x = torch.randn(2, 3, 16, 16)
    padded = F.pad(x, (2,) * 4, mode="replicate")
    assert torch.equal(jittered_patch_grid(x, 8, 4, 0), patch_grid(x, 8, 4))
    grid = jittered_patch_grid(x, 8, 4, 2)
    offsets = set()
    for b in range(2):
        for i in range(3):
            for j in range(3):
                found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                         if torch.equal(grid[b, i, j], padded[b, :, 4 * i + 2 + dy:4 * i + 10 + dy,
                                                               4 * j + 2 + dx:4 * j + 10 + dx])]
                assert found, (b, i, j)
                offsets.add(found[0])
    assert len(offsets) > 3  # patches move independently
    patches = torch.randn(3, 3, 8, 8)
    turned = rotate_patches(patches, torch.tensor([90.0, -90.0, 0.0]))
    assert torch.allclose(turned[0], torch.rot90(patches[0], 1, (1, 2)), atol=1e-5)
    assert torch.allclose(turned[1], torch.rot90(patches[1], -1, (1, 2)), atol=1e-5)
    assert torch.allclose(turned[2], patches[2], atol=1e-5)
    model = CPCModel(CPCModelConfig(patch_jitter=2, patch_rotate=20))
    big = x.repeat(1, 1, 2, 2)
    with torch.no_grad():  # only while training: evaluation features are deterministic
        assert not torch.equal(model.train().patch_features(big), model.patch_features(big))
        assert torch.equal(model.eval().encode_image(big), model.encode_image(big))


@pytest.mark.parametrize("normalize", [False, True])
def test_cpc_loss_matches_the_definition(normalize: bool) -> None:
    cpc = CPCLoss(CPCConfig(steps=2, normalize=normalize, temperature=0.5))
    cpc.setup(type("M", (), {"context_dim": 3, "embed_dim": 4})(), 10)
    z, c = torch.randn(2, 4, 2, 4, dtype=torch.float64), torch.randn(2, 4, 2, 3, dtype=torch.float64)
    cpc.double()
    loss, metrics = cpc({"z": z, "c": c})

    def score(pred: torch.Tensor, target: torch.Tensor) -> float:
        if not normalize:
            return dot(pred, target)
        return dot(pred, target) / math.sqrt(dot(pred, pred) * dot(target, target)) / 0.5

    ref = 0.0
    for k, w in enumerate(cpc.predictors, start=1):
        targets = [(b, i, j) for b in range(2) for i in range(k, 4) for j in range(2)]
        total = 0.0
        for b, i, j in [(b, i, j) for b in range(2) for i in range(4 - k) for j in range(2)]:
            pred = w.weight.detach() @ c[b, i, j]
            scores = [score(pred, z[t]) for t in targets]
            pos = targets.index((b, i + k, j))
            total += -(scores[pos] - math.log(sum(math.exp(s) for s in scores)))
        ref += total / len(targets)
    assert loss.item() == pytest.approx(ref / 2, rel=1e-6)
    assert set(metrics) >= {"acc_k1", "acc_k2"}


def test_colour_spaces_against_known_values_and_pil() -> None:
    rgb = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]).T[:, :, None].double()
    lab = srgb_to_lab(rgb)[:, :, 0].T * torch.tensor([100.0, 255, 255]) - torch.tensor([0.0, 128, 128])
    known = torch.tensor([[53.24, 80.09, 67.20], [87.74, -86.18, 83.18], [32.30, 79.19, -107.86], [100, 0, 0]])
    assert torch.allclose(lab.float(), known, atol=0.02)
    arr = np.random.default_rng(0).integers(0, 256, (7, 7, 3), dtype=np.uint8)
    pil = torch.from_numpy(np.array(Image.fromarray(arr).convert("YCbCr"))).permute(2, 0, 1).double() / 255
    ours = rgb_to_ycbcr(torch.from_numpy(arr).permute(2, 0, 1).double() / 255)
    assert (ours - pil).abs().max() < 1.5 / 255  # PIL rounds to 8 bits
    tf = build_transform("eval", 7, (0.5,) * 3, (0.5,) * 3, colour="lab")
    assert torch.allclose(tf(Image.fromarray(arr)), (srgb_to_lab(torch.from_numpy(arr).permute(2, 0, 1) / 255) - 0.5)
                          / 0.5, atol=1e-5)
