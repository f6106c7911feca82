"""Train the sentencepiece tokenizer: fixed ids pad=0 eos=1 unk=2 bos=3, sentinels.

    python data_prep/train_tokenizer.py --input corpus/ more.jsonl.gz --vocab-size 32000 \\
        --output data/tokenizer

Writes OUTPUT/tokenizer.model and OUTPUT/tokenizer_settings.json (its settings and
sha256). Inputs: .txt/.md (one document per blank-line-separated block, or
per file with --txt-docs file), .jsonl (--text-field), gzip of either,
.parquet (a row per document, column --text-field; needs pyarrow) and
directories (recursive). Large inputs are streamed and sampled
(--input-sentence-size lines, uniformly), never read whole into memory.
Bad inputs are counted per file and reported (--bad-input skip) or stop the
run naming the file (--bad-input fail).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from tqdm import tqdm

from liquid_dist.data.errors import DataError
from liquid_dist.data.text_inputs import InputReport, expand_inputs, iter_documents
from liquid_dist.data.tokenizer import SETTINGS_NAME, train_tokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files or directories")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output", required=True, help="directory for tokenizer.model/.json")
    p.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    p.add_argument("--num-sentinels", type=int, default=100)
    p.add_argument("--txt-docs", choices=["blank-line", "file"], default="blank-line")
    p.add_argument("--text-field", default="text", help="JSON field holding the text")
    p.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="lines sampled for training (0: all)")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--bad-input", choices=["fail", "skip"], default="skip")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    start = time.time()
    report = InputReport()
    try:
        files = expand_inputs(args.input)
        docs = iter_documents(files, report, txt_docs=args.txt_docs, text_field=args.text_field,
                              policy=args.bad_input)
        texts = (d.text for d in tqdm(docs, desc="reading", unit="doc",
                                      disable=args.no_progress))
        path = train_tokenizer(
            texts, args.output, vocab_size=args.vocab_size, model_type=args.model_type,
            num_sentinels=args.num_sentinels, character_coverage=args.character_coverage,
            input_sentence_size=args.input_sentence_size, seed=args.seed,
            num_threads=args.threads)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(report.summary(), file=sys.stderr)
        return 2
    # what was read is known only once training consumed the inputs
    settings_path = path.parent / SETTINGS_NAME
    settings = json.loads(settings_path.read_text())
    settings.update(inputs=[str(i) for i in args.input], txt_docs=args.txt_docs,
                    text_field=args.text_field, documents=report.total("documents"),
                    input_report=report.to_dict())
    settings_path.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
    print(report.summary())
    print(f"wrote {path} ({time.time() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
