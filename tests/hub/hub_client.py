"""Run in a subprocess with HF_ENDPOINT/HF_HOME/HF_TOKEN set (as a user would): load a pushed
model from the Hub stand-in with mmcl and with open_clip, and print what they compute as JSON.

    python tests/hub/hub_client.py REPO_ID LOCAL_FOLDER SHARDS [--offline]
"""

from __future__ import annotations

import json
import sys

import torch


def main() -> None:
    repo, local, shards = sys.argv[1:4]
    from mmcl.evaluate.open_clip_model import OpenClipModel
    from mmcl.evaluate.run import zeroshot
    from mmcl.hub import from_pretrained

    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    reference = from_pretrained(local)
    tokens = reference.tokenizer()(["zero", "a handwritten seven", "nine"])
    models = {"mmcl_hub": from_pretrained(repo)}
    if "--offline" not in sys.argv:
        models["open_clip_hf_hub"] = OpenClipModel(f"hf-hub:{repo}")
        models["open_clip_local_dir"] = OpenClipModel(f"local-dir:{local}")
    out: dict[str, dict] = {}
    with torch.no_grad():
        ref_img, ref_txt = reference.encode_image(images), reference.encode_text(tokens)
        for name, model in {"mmcl_local": reference, **models}.items():
            pre = model.preprocess if isinstance(model, OpenClipModel) else model.mmcl_config["preprocess"]
            res = zeroshot(model, shards, preprocess=pre, templates="digits", num_workers=0)
            out[name] = {"image_diff": (model.encode_image(images) - ref_img).abs().max().item(),
                         "text_diff": (model.encode_text(tokens) - ref_txt).abs().max().item(),
                         "top1": res["top1"], "confusion": res["confusion"],
                         "preprocess": pre}
        if "--offline" not in sys.argv:  # the transformers form, from final/transformers/ in the repo
            from transformers import CLIPModel

            hf = CLIPModel.from_pretrained(repo, subfolder="transformers").eval()
            unit = lambda x: torch.nn.functional.normalize(x.pooler_output, dim=-1)  # noqa: E731
            out["transformers_hub"] = {
                "image_diff": (unit(hf.get_image_features(pixel_values=images)) - ref_img).abs().max().item(),
                "text_diff": (unit(hf.get_text_features(input_ids=tokens)) - ref_txt).abs().max().item()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
