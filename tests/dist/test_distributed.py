"""Two real gloo processes (torchrun) against one process on the same global batch: CLIP and the
single-modal objectives (loss, gradients, MoCo's queue)."""

from __future__ import annotations

import json
from pathlib import Path

from .launch import torchrun

HERE = Path(__file__).parent


def test_two_process_clip_gradients_equal_one_process(tmp_path: Path) -> None:
    out = tmp_path / "grad.json"
    torchrun(HERE / "clip_grad_worker.py", str(out))
    res = json.loads(out.read_text())
    for mode in ("False", "True"):  # without and with local_loss, against the paper's loss on the whole batch
        r = res[mode]
        assert abs(r["loss"] - r["ref_loss"]) < 1e-5 and r["ref_loss"] > 1.0, (mode, r)
        assert r["same_params"] and r["n_params"] > 50, (mode, r)
        assert r["max_grad_diff"] < 1e-5 and r["max_grad"] > 1e-3, (mode, r)
        # the temperature's gradient: it flows through the gathered logits of both processes
        assert abs(r["scale_grad"] - r["ref_scale_grad"]) < 1e-5 and abs(r["ref_scale_grad"]) > 1e-3, (mode, r)


def test_two_process_ssl_objectives_equal_one_process(tmp_path: Path) -> None:
    import torch

    for procs in (1, 2):
        torchrun(HERE / "ssl_worker.py", str(tmp_path / f"{procs}.pt"), nproc=procs)
    one, two = (torch.load(tmp_path / f"{p}.pt") for p in (1, 2))
    assert set(one) == {"simclr", "moco", "mocov3", "byol", "simsiam", "invaspread", "cmc", "cmc_full_lab", "cpc",
                        "cpc_gru", "instdisc", "cmc_bank", "swav", "dino", "sinkhorn", "dcl", "dclw", "nnclr",
                        "barlow_twins", "vicreg"}
    # Sinkhorn over the global batch: each process's share of the assignments is the one-process result
    assert torch.allclose(one["sinkhorn"], two["sinkhorn"], atol=1e-6)
    assert torch.allclose(two["sinkhorn"].sum(dim=1), torch.ones(8), atol=1e-5)
    assert torch.allclose(one["dino"]["center"], two["dino"]["center"], atol=1e-6)
    for name in ("instdisc", "cmc_bank"):  # every process applied every process's bank updates, once
        for rows1, rows2, seen in zip(one[name]["rows"], two[name]["rows"], two[name]["seen"]):
            assert torch.allclose(rows1, rows2, atol=1e-6), name
            assert seen.nonzero().squeeze(1).tolist() == [0, 2, 3, 5, 7, 11, 13, 19]
    for name in one.keys() - {"instdisc", "cmc_bank", "sinkhorn"}:
        a, b = one[name], two[name]
        assert abs(a["loss"] - b["loss"]) < 1e-5, (name, a["loss"], b["loss"])
        assert set(a["grads"]) == set(b["grads"]) and len(a["grads"]) >= 6, name
        diff = max((a["grads"][k] - b["grads"][k]).abs().max().item() for k in a["grads"])
        scale = max(g.abs().max().item() for g in a["grads"].values())
        # float32 round-off relative to the gradients' size (Barlow Twins' reach 24 on these batches)
        assert diff < 1e-5 * max(1.0, scale) and scale > 1e-4, (name, diff, scale)
    # every process enqueued every process's keys, in rank order: the queues are the one-process queue
    assert torch.allclose(one["moco"]["queue"], two["moco"]["queue"], atol=1e-6)
    assert one["moco"]["ptr"] == two["moco"]["ptr"] == 8
    # NNCLR: every process enqueued every process's view-1 projections, in rank order, after the step
    assert torch.allclose(one["nnclr"]["support"], two["nnclr"]["support"], atol=1e-6)
    assert one["nnclr"]["support_ptr"] == two["nnclr"]["support_ptr"] == 8
