"""The ``mmcl`` command line (also ``python -m mmcl``; runs under ``accelerate launch``).

    mmcl train --config configs/clip_digits.yaml [--set optim.lr=1e-3] [--resume latest]
    mmcl eval zeroshot --model runs/clip_digits/final --shards "data/digits/test-{000000..000001}.tar"
    mmcl eval retrieval --model runs/clip_digits/final --shards ...
    mmcl eval zeroshot --model hf-hub:org/name --shards ...   (load with open_clip itself)
    mmcl eval knn --model runs/simclr_digits/final --train-shards "data/digits/train-{000000..000004}.tar" \
        --shards "data/digits/test-{000000..000001}.tar" [--k 20] [--temperature 0.07]
    mmcl eval linear --model runs/simclr_digits/final --train-shards ... --shards ...
    mmcl push --model runs/clip_digits/final --repo-id org/name [--private] [--revision BRANCH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmcl.argtypes import non_negative_int, positive_float, positive_int
from mmcl.errors import MmclError, run_cli
from mmcl.files import write_atomic


def parser() -> argparse.ArgumentParser:
    """The ``mmcl`` argument parser."""
    ap = argparse.ArgumentParser(prog="mmcl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a recipe")
    p.add_argument("--config", required=True, help="recipe YAML (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one recipe key, e.g. optim.lr=1e-3 (repeatable)")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")

    ev = sub.add_parser("eval", help="evaluate a saved model").add_subparsers(dest="task", required=True)
    for task, helptext in (("zeroshot", "zero-shot classification"), ("retrieval", "image-text retrieval R@k"),
                           ("knn", "weighted kNN on frozen features"), ("linear", "linear probe on frozen features")):
        p = ev.add_parser(task, help=helptext)
        p.add_argument("--model", required=True,
                       help="model folder (RUN/final), Hub repo id, or hf-hub:ID / local-dir:PATH to load "
                            "with open_clip itself")
        p.add_argument("--no-record", dest="record", action="store_false",
                       help="do not add the result to a local model folder's config and card")
        p.add_argument("--shards", required=True, action="append",
                       help="brace pattern of evaluation shards (knn/linear: repeatable)")
        if task in ("knn", "linear"):
            p.add_argument("--train-shards", required=True, help="labelled reference shards (e.g. the train split)")
        if task == "knn":
            p.add_argument("--k", type=positive_int, default=20)
            p.add_argument("--temperature", type=positive_float, default=0.07)
        p.add_argument("--batch-size", type=positive_int, default=256)
        p.add_argument("--workers", type=non_negative_int, default=2)
        p.add_argument("--out", type=Path, default=None, help="report folder (default: next to the model)")
        if task == "zeroshot":
            p.add_argument("--templates", default="openai",
                           help="openai | simple | mnist | digits, or a text file with one template a line "
                                "('{}' or '{c}' where the class name goes)")
            p.add_argument("--classes", type=Path, default=None, help="text file, one class name per line")

    p = sub.add_parser("push", help="upload a saved model folder to the Hugging Face Hub")
    p.add_argument("--model", required=True, type=Path, help="model folder (RUN/final)")
    p.add_argument("--repo-id", required=True, help="ORG/NAME (created if missing)")
    vis = p.add_mutually_exclusive_group()
    vis.add_argument("--private", dest="private", action="store_true", default=True,
                     help="create the repo private (default)")
    vis.add_argument("--public", dest="private", action="store_false", help="create the repo public")
    p.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    p.add_argument("--commit-message", default=None)

    p = sub.add_parser("report", help="draw a run's logged curves and write RUN/report/report.md")
    p.add_argument("run", type=Path, help="the run folder (run.output_dir)")

    p = sub.add_parser("merge", help="WiSE-FT: interpolate a fine-tuned model's weights with its zero-shot start")
    p.add_argument("--fine-tuned", required=True, help="model folder (RUN/final) or Hub repo id")
    p.add_argument("--zero-shot", default=None,
                   help="model folder or Hub repo id (default: the weights the fine-tuned run started from)")
    p.add_argument("--alpha", type=float, default=0.5, help="0: the zero-shot model, 1: the fine-tuned one")
    p.add_argument("--out", required=True, type=Path, help="folder to write the merged model to")
    return ap


def _train(args: argparse.Namespace) -> int:
    from mmcl.evaluate.run import result_lines
    from mmcl.recipe import load_recipe
    from mmcl.train import Trainer

    recipe = load_recipe(args.config, args.overrides)
    trainer = Trainer(recipe)
    try:
        final = trainer.fit(args.resume)
        for line in result_lines(trainer.final_evals):
            trainer.acc.print(line)
        trainer.acc.print(f"final model: {final}")
    finally:
        trainer.acc.state.destroy_process_group()  # fit leaves it to whoever runs it: here, the command
    return 0


def _load_for_eval(spec: str):  # noqa: ANN202
    """The model to evaluate and the image preprocessing it was saved with."""
    from mmcl.evaluate.open_clip_model import OpenClipModel, is_open_clip_spec
    from mmcl.hub import from_pretrained

    if is_open_clip_spec(spec):
        model = OpenClipModel(spec)
        return model, model.preprocess
    model = from_pretrained(spec)
    return model, model.mmcl_config["preprocess"]


def _eval(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    from mmcl.evaluate.run import result, retrieval_eval, zeroshot
    from mmcl.evaluate.zeroshot import save_report
    from mmcl.hub import record_eval

    acc = Accelerator()
    model, preprocess = _load_for_eval(args.model)
    model = model.to(acc.device)
    local = Path(args.model).is_dir()
    out = args.out or (Path(args.model).parent / "eval" if local else Path("eval"))
    if args.task in ("knn", "linear"):
        return _frozen(args, model, preprocess, acc, out, local)
    if len(args.shards) > 1:
        raise MmclError(f"eval {args.task}: give --shards once")
    args.shards = args.shards[0]
    if args.task == "retrieval":
        res = retrieval_eval(model, args.shards, preprocess=preprocess, batch_size=args.batch_size,
                             num_workers=args.workers, device=acc.device)
        recalls = {k: v for k, v in res.items() if k not in ("n", "skipped")}
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            write_atomic(out / "retrieval.json", json.dumps(res, indent=2) + "\n")
            if local and args.record:
                record_eval(args.model, [result("retrieval", args.shards, recalls, skipped=res["skipped"])])
            for k, v in recalls.items():
                print(f"{k}: {v:.3f}")
            if res["skipped"]:
                print(f"skipped samples: {res['skipped']}")
            print(f"retrieval over {res['n']} image-text pairs")
        return 0
    templates: object = args.templates
    if Path(args.templates).is_file():
        templates = [t for t in Path(args.templates).read_text().splitlines() if t.strip()]
    classes = None
    if args.classes:
        if not args.classes.is_file():
            raise MmclError(f"--classes {args.classes}: no such file")
        classes = [c.strip() for c in args.classes.read_text().splitlines() if c.strip()]
    res = zeroshot(model, args.shards, preprocess=preprocess, templates=templates, classes=classes,
                   batch_size=args.batch_size, num_workers=args.workers, device=acc.device)
    if acc.is_main_process:
        names = res["class_names"]
        save_report(res, names, out)
        if local and args.record:
            record_eval(args.model, [result("zeroshot", args.shards, {"top1": res["top1"], "top5": res["top5"]},
                                            templates=args.templates)])
        if res["skipped"]:
            print(f"skipped samples: {res['skipped']}")
        worst = sorted(zip(res["per_class"], names))[:3]
        print("hardest classes: " + ", ".join(f"{n} {a:.3f}" for a, n in worst))
        print(f"report: {out / 'zeroshot.json'}, {out / 'zeroshot_confusion.png'}")
        print(f"zero-shot top-5: {res['top5']:.3f}")
        print(f"zero-shot top-1: {res['top1']:.3f} on {res['n']} test images")
    return 0


def _frozen(args: argparse.Namespace, model, preprocess: dict, acc, out: Path, local: bool) -> int:  # noqa: ANN001
    from mmcl.evaluate.run import frozen_feature_evals
    from mmcl.hub import record_eval

    knn = args.task == "knn"
    results = frozen_feature_evals(model, args.train_shards, args.shards, preprocess=preprocess, knn=knn,
                                   linear=not knn, k=getattr(args, "k", 20),
                                   temperature=getattr(args, "temperature", 0.07),
                                   batch_size=args.batch_size, num_workers=args.workers, device=acc.device)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / f"{args.task}.json", json.dumps(results, indent=2) + "\n")
        if local and args.record:
            record_eval(args.model, results)
        for r in results:
            d = r["dataset"]
            print(f"{args.task} top-1: {r['metrics']['top1']:.3f} on {d['name']} ({d['samples'] or '?'} images)")
            if r.get("skipped"):
                print(f"  skipped samples: {r['skipped']}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from mmcl.hub import push

    url = push(args.model, args.repo_id, private=args.private, revision=args.revision,
               commit_message=args.commit_message)
    print(f"pushed {args.model} to {args.repo_id}: {url}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from mmcl.report import write_report

    print(f"report: {write_report(args.run)}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from mmcl.merge import merge

    out = merge(args.fine_tuned, args.out, args.alpha, args.zero_shot)
    print(f"merged model (alpha {args.alpha}): {out}; evaluate it with mmcl eval")
    return 0


def _run(args: argparse.Namespace) -> int:
    return {"train": _train, "eval": _eval, "push": _push, "merge": _merge, "report": _report}[args.command](args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mmcl``."""
    return run_cli(_run, parser().parse_args(argv))
