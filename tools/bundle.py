"""Bundle a trained run as a named model in `src/resunetpp/weights/NAME/`: fp16 weights, and a config.json
with its provenance and the test metrics recomputed here on the CPU from those fp16 weights.

    python tools/bundle.py RUN NAME --data ../shared/data/Kvasir-SEG --trained '{"device": "...", "command": "..."}'

Prints the test table and the figures a model card states; the card itself (MODEL_CARD.md) is written by
hand, and tests/inference/test_bundled.py checks it against config.json and a fresh evaluation.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from resunetpp.evaluation.evaluator import evaluate
from resunetpp.hub import CONFIG_NAME, WEIGHTS_DIR, load_model, save_pretrained

# config.json's detection keys: evaluate's names, as the bundled cards state them
DETECTION = {"polyps": "polyps", "sensitivity_iou50": "sensitivity_iou50", "sensitivity_any": "sensitivity_any",
             "fp_components_per_image_no_overlap": "fp_per_image_any", "polyp_dice_median": "polyp_dice_median"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("name")
    ap.add_argument("--data", type=Path, required=True, help="the original dataset folder (its test split is scored)")
    ap.add_argument("--trained", default="{}", help="JSON: device, torch, date, command, ... of the training")
    args = ap.parse_args()
    raw = json.loads((args.run / CONFIG_NAME).read_text())
    model = load_model(args.run)
    dest = WEIGHTS_DIR / args.name
    tmp = dest.with_name(f".{args.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    config = {**raw, "name": args.name, "weights_dtype": "float16", "trained": json.loads(args.trained)}
    split = dict(raw.get("split") or {})
    if split.get("source") == f"committed {raw.get('dataset')} split":  # the package's file, not the run's copy
        config["split"] = {**split, "file": f"resunetpp/splits/{raw['dataset']}.json"}
    save_pretrained(model, tmp, config, dtype=torch.float16)
    result = evaluate(tmp, args.data, split="test", device="cpu", progress=False)
    s = result.summary
    test = {k: round(v, 4) for k, v in s["mean"].items()}
    test["miou_keras"] = round(s["miou_keras"], 4)
    d = s["detection"]
    test["detection"] = {k: round(d[v], 4) if isinstance(d[v], float) else d[v] for k, v in DETECTION.items()}
    config["metrics"] = {**raw.get("metrics", {}), "test": test,
                         "test_scored": f"mean over the {s['images']} test images at "
                                        f"{'x'.join(map(str, raw['input_size']))}, threshold 0.5, fp32 on a CPU "
                                        "from these fp16 weights"}
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    if dest.exists():
        card = dest / "MODEL_CARD.md"
        if card.is_file():
            shutil.copy(card, tmp / "MODEL_CARD.md")
        shutil.rmtree(dest)
    tmp.rename(dest)
    print(json.dumps(test, indent=2))
    print("| Dice | IoU | recall | precision | F2 | accuracy | mIoU (2-class) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("| " + " | ".join(f"{test[k]:.4f}" for k in ("dice", "iou", "recall", "precision", "f2", "accuracy",
                                                       "miou_2class")) + " |")


if __name__ == "__main__":
    main()
