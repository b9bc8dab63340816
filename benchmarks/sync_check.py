"""Does a training step make the host wait for the GPU? torch's own sync debugger, on real steps.

    python benchmarks/sync_check.py [--steps 5]

``tests/test_no_host_sync.py`` finds such waits on the CPU with a dispatch probe, which cannot see
every kind (``.tolist()``, a copy from pageable memory, a library's own wait). On a GPU this runs
the same cases (tiny digits runs of CLIP with ``data.normalize: device``, tiled CLIP with
``local_loss``, FLIP patch dropout, SigLIP plain and tiled, BYOL, MoCo v3, DINO, SwAV (its queue
off: it is read until it is full), InstDisc's memory bank with NCE, BYOL with LARS, and CLIP with
``data.decode: device``) through ``Loader.prepare`` + ``Trainer.train_step`` under
``torch.cuda.set_sync_debug_mode("warn")`` after two warm-up steps, and prints each case's number
of synchronising calls with the source lines that made them. The trainer's intended waits are left
out: the host vote (``train.vote: host``, which BYOL, MoCo v3, DINO and SwAV need, and LARS, which
has no fused kernel to skip a step on the device) and the drain before the device decodes JPEGs
(``data.decode: device``, pytorch/vision#9606). Without a GPU the steps run on the CPU as a smoke
test and nothing is counted.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMALL = ["model.backbone.width=8", "model.projector.dims=[32,16]", "objective.predictor.dims=[32,16]"]
# also the cases of tests/test_no_host_sync.py, which probes them on the CPU (all but the JPEG one)
CASES = {
    "clip": ("clip_digits.yaml",),
    "clip tiled local": ("clip_digits.yaml", "objective.tile=6", "objective.local_loss=true"),
    "clip patch dropout": ("clip_digits.yaml", "model.patch_dropout=0.5"),
    "clip decode on device": ("clip_digits.yaml", "data.decode=device", "data.transform=clip"),
    "siglip": ("siglip_digits.yaml",),
    "siglip tiled": ("siglip_digits.yaml", "objective.tile=6"),
    "byol": ("byol_digits.yaml", *SMALL),
    "mocov3": ("moco_v3_digits.yaml", *SMALL),
    # schedules on the step (teacher temperature, frozen last layer / prototypes); SwAV's queue is read
    # from the device until it is full, so it is off here
    "dino": ("dino_digits.yaml", "model.backbone.width=8", "objective.warmup_teacher_steps=10",
             "objective.freeze_last_layer_steps=1"),
    "swav": ("swav_digits.yaml", "model.backbone.width=8", "objective.queue_length=0",
             "objective.freeze_prototypes_steps=1"),
    # the memory bank (id check, negatives among the filled rows, last-occurrence update) and NCE's normaliser
    "instdisc nce": ("instdisc_digits.yaml", "model.backbone.width=8", "objective.loss=nce"),
    # LARS (BYOL's ImageNet optimizer) has no fused kernel: a host vote (left out) around its multi-tensor step
    "byol lars": ("byol_digits.yaml", *SMALL, "optim.name=lars", "optim.fused=false"),
}


@contextlib.contextmanager
def sync_debug(on: bool) -> Iterator[None]:
    """torch's sync debugger set to warn (on a GPU), restored after."""
    if not torch.cuda.is_available():
        yield
        return
    was = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn" if on else 0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(was)


def where(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frame of mmcl's (else the innermost) that made the call."""
    ours = [f for f in stack if "/mmcl/" in f.filename and "sync_check" not in f.filename]
    f = (ours or stack)[-1]
    return f"{Path(f.filename).name}:{f.lineno} ({f.name})"


def check(name: str, config: str, extra: list[str], shards: str, out: Path, steps: int) -> Counter[str]:
    from mmcl.data import device_decode
    from mmcl.recipe import load_recipe
    from mmcl.train import Trainer

    jpeg = "data.decode=device" in extra
    sets = [f"data.train_shards={shards}", f"run.output_dir={out}", "data.batch_size=16", "data.num_workers=2",
            "data.shuffle_buffer=20", "train.steps=100", "train.log_every=1000", "train.progress=false",
            "train.trackers=[]", "optim.fused=true", "optim.warmup_steps=2", "eval.zeroshot_shards=null",
            *(["data.image_size=32"] if jpeg else []), *extra]
    trainer = Trainer(load_recipe(ROOT / "configs" / config, sets))
    found: Counter[str] = Counter()
    votes, drain = trainer._votes, device_decode.drain

    def host_vote(*flags):  # train.vote: host waits on purpose
        with sync_debug(False):
            return votes(*flags)

    def drained(device):  # data.decode: device waits on purpose (pytorch/vision#9606)
        with sync_debug(False):
            drain(device)

    trainer._votes, device_decode.drain = host_vote, drained
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            found[where(traceback.extract_stack()[:-1])] += 1
        else:
            shown(message, category, filename, lineno, file, line)

    trainer.loader.set_epoch(0)
    batches = iter(trainer.loader)
    try:
        for step in range(2 + steps):
            batch = next(batches)
            with sync_debug(step >= 2), warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = record
                trainer.train_step(trainer.loader.prepare(batch, trainer.acc.device))
            warnings.showwarning = shown
    finally:
        device_decode.drain = drain
        trainer.loader.close()
    total = sum(found.values())
    print(f"{name:24s} {total:3d} synchronising calls in {steps} steps" + "".join(
        f"\n    {n:3d}  {w}" for w, n in found.most_common()), flush=True)
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    import mmcl.models  # noqa: F401  (registers the built-in models and objectives)
    import mmcl.objectives  # noqa: F401
    from data_prep.cli import main as prep

    tmp = Path(tempfile.mkdtemp())
    prep(["digits", "--out", str(tmp / "digits"), "--no-progress"])
    prep(["digits", "--out", str(tmp / "digits_jpg"), "--format", "jpg", "--no-progress"])
    cuda = torch.cuda.is_available()
    print(f"{torch.cuda.get_device_name() if cuda else 'CPU (a smoke test: nothing is counted)'}, "
          f"torch {torch.__version__}")
    total = 0
    for i, name in enumerate(args.cases.split(",")):
        config, *extra = CASES[name]
        folder = tmp / ("digits_jpg" if "data.decode=device" in extra else "digits")
        total += sum(check(name, config, extra, f"{folder}/train-{{000000..000004}}.tar", tmp / f"run{i}",
                           args.steps).values())
    print(f"in all: {total} synchronising calls")
    if cuda and total:
        sys.exit("sync_check.py: training steps waited for the host (above)")


if __name__ == "__main__":
    main()
