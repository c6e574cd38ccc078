"""The real training curves the collapse guard is tested on, taken from compare_recipes run folders.

Each llm2emb run of `scripts.compare_recipes` trains with the guard off and logs every step's loss, chance loss and
embedding spread. This writes one line per clearly labelled run: `healthy` when its score (STS-B dev, else test) is
at least `--healthy`, failed when at most `--failed` (the untrained SmolLM2-135M scores 14 on STS-B dev); runs in
between are left out, since neither verdict would be wrong for them. tests/train/test_collapse.py replays every line
through the default guard.

    python -m scripts.spread_curves runs/screen20 runs/screen51 --out tests/train/data/spread_curves.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llm2emb.train.recipe_file import load_recipe


def curve_of(folder: Path, healthy_at: float, failed_at: float) -> dict | None:
    results = sorted(folder.glob("result-*.json"))
    metrics = folder / "run" / "metrics.jsonl"
    if not results or not metrics.is_file():
        return None
    result = json.loads(results[0].read_text())
    score = result.get("stsb-dev", result.get("stsb"))
    if score is None or failed_at < score < healthy_at:
        return None
    stage = load_recipe(folder / "run" / "recipe.resolved.yaml").stages[0]
    steps = [{"step": r["step"], "loss": round(r["loss"], 4), "chance_loss": r.get("chance_loss"),
              "embedding_cosine": r["embedding_cosine"]}
             for r in map(json.loads, metrics.read_text().splitlines())
             if "loss" in r and "embedding_cosine" in r]
    if len(steps) < stage.max_steps:
        return None  # not logged every step
    return {"name": f"{folder.parent.name}/{folder.name}", "stsb_dev": score, "healthy": score >= healthy_at,
            "warmup_steps": stage.warmup_step_count, "steps": steps}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("outs", nargs="+", help="compare_recipes --out folders")
    p.add_argument("--out", required=True, help="JSONL to write")
    p.add_argument("--healthy", type=float, default=40.0)
    p.add_argument("--failed", type=float, default=25.0)
    args = p.parse_args(argv)
    curves = [curve for out in args.outs for folder in sorted(Path(out).iterdir())
              if folder.is_dir() and (folder / "run").is_dir()
              for curve in [curve_of(folder, args.healthy, args.failed)] if curve]
    Path(args.out).write_text("".join(json.dumps(c) + "\n" for c in curves))
    print(f"{len(curves)} curves ({sum(c['healthy'] for c in curves)} healthy) -> {args.out}")


if __name__ == "__main__":
    main()
