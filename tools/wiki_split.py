"""Write the development split of the shared Wikipedia summaries used for decisions (ablations, tuning).

The project's text, all from ``wiki-summaries`` (lead sections of English Wikipedia's Vital Articles,
CC BY-SA 4.0, see ``demo/data/README.md``), in three disjoint parts:

- calibration: ``wiki.train.txt`` (about 9,000 summaries; the demo ships its first 400 as
  ``demo/data/calib.txt``); pruning sees only this;
- development: summaries 250–500 of ``wiki.valid.txt``, written here to ``out/data/wiki-dev.txt``; the
  ablations and every design decision of the Θ search were measured on this;
- evaluation: summaries 0–249 of ``wiki.valid.txt`` = ``demo/data/eval.txt`` (shipped); only the final
  tables are measured on it, nothing is tuned to it.

    python tools/wiki_split.py --valid ../shared/data/wiki-summaries/wiki.valid.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

EVAL_DOCS = 250  # demo/data/eval.txt holds the first 250 summaries of wiki.valid.txt


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--valid", type=Path, default=Path("../shared/data/wiki-summaries/wiki.valid.txt"),
                    help="wiki.valid.txt of the shared summaries (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=Path("out/data/wiki-dev.txt"), help="(default: %(default)s)")
    args = ap.parse_args(argv)
    docs = [d.strip() for d in args.valid.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    evaluation = Path(__file__).resolve().parent.parent / "demo" / "data" / "eval.txt"
    shipped = [d.strip() for d in evaluation.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    if docs[:EVAL_DOCS] != shipped:
        raise SystemExit(f"{args.valid}: its first {EVAL_DOCS} summaries are not demo/data/eval.txt; wrong file?")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n\n".join(docs[EVAL_DOCS:]) + "\n", encoding="utf-8")
    print(f"{args.out}: {len(docs) - EVAL_DOCS} summaries (wiki.valid.txt {EVAL_DOCS}–{len(docs) - 1})")


if __name__ == "__main__":
    main()
