"""Text from a converted model (docs/convert.md).

    python -m liquid_dist.generate OUT --prompt TEXT [--max-new-tokens N]
        [--sample --temperature T --top-k K --top-p P] [--beams N] [--seed S]
    echo "To be, or not" | python -m liquid_dist.generate OUT --prompt -
    python -m liquid_dist.generate OUT --prompts-file prompts.txt   # one JSON line each
    python -m liquid_dist.generate OUT --fill-spans --prompt "To be, <extra_id_0> to be"

The prompt is tokenised with the shipped tokenizer and given to the encoder
as a prefix-LM input (prompt + EOS, keeping the last max_encoder_length - 1
tokens); the decoder, started with the prefix-LM start token, continues it
as text, never writing a sentinel (``suppress_tokens``). ``--fill-spans``
starts it with the span-corruption start token instead and allows the
sentinels: the output is the spans the prompt's sentinels stand for, each
after its sentinel, as in span-corruption training. One prompt: the continuation is streamed
to stdout token by token (beam search prints it at the end). A prompts file
(one prompt per line, blank lines skipped) is decoded in batches and printed
as JSON lines ``{"prompt": ..., "generated": ...}``.

Every decoding option left out takes its value from the model's
``generation_config.json`` (``model.generation_config``): ``--max-new-tokens``,
``--sample`` / ``--no-sample``, ``--temperature``, ``--top-k``, ``--top-p``, ``--beams``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Optional

import torch

from liquid_dist.data.tokenizer import MODEL_NAME as TOKENIZER_NAME


def encode_prompts(tok: Any, prompts: Sequence[str], max_len: int) -> tuple[torch.Tensor,
                                                                            torch.Tensor]:
    """(ids (B, L), mask (B, L) bool): each prompt + EOS, right-padded, cut to ``max_len``."""
    rows = [tok.encode(p)[-(max_len - 1):] + [tok.eos_id] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return ids, mask


def _text(tok: Any, ids: Sequence[int]) -> str:
    keep = []
    for i in ids:
        if i == tok.eos_id:
            break
        if i != tok.pad_id:
            keep.append(int(i))
    return tok.decode(keep)


@torch.no_grad()
def stream(model: Any, tok: Any, prompt: str, out: IO[str], *, max_new_tokens: int,
           do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> str:
    """Greedy or sampled continuation of one prompt, written to ``out`` as it is decoded.

    Returns the whole continuation (without EOS).
    """
    from liquid_dist.model.generation import IncrementalDecoder, choose_next, suppress

    cfg = model.cfg
    gen = model.generation_config
    device = model.lm_head.weight.device
    ids, mask = encode_prompts(tok, [prompt], cfg.max_encoder_length)
    dec = IncrementalDecoder(model)
    dec.start(ids.to(device), mask.to(device))
    token = torch.full((1,), gen.decoder_start_token_id, dtype=torch.long, device=device)
    generated: list[int] = []
    shown = ""
    for pos in range(max_new_tokens):
        token = choose_next(suppress(dec.step(token, pos), gen.suppress_tokens), do_sample,
                            temperature, top_k, top_p, generator)
        if int(token) == tok.eos_id:
            break
        generated.append(int(token))
        text = tok.decode(generated)
        # sentencepiece may rewrite the tail when a piece joins the next one
        if text.startswith(shown):
            out.write(text[len(shown):])
            out.flush()
            shown = text
    text = tok.decode(generated)
    if text != shown:
        out.write(text[len(shown):] if text.startswith(shown) else "\n" + text)
    out.write("\n")
    out.flush()
    return text


def generate_batch(model: Any, tok: Any, prompts: Sequence[str], *, max_new_tokens: int,
                   batch_size: int = 8, **kwargs: Any) -> list[str]:
    """Continuations of ``prompts`` (``kwargs`` as for the model's ``generate``)."""
    device = model.lm_head.weight.device
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        ids, mask = encode_prompts(tok, chunk, model.cfg.max_encoder_length)
        result = model.generate(ids.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                                eos_token_id=tok.eos_id, **kwargs)
        out += [_text(tok, row[1:].tolist()) for row in result]
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="liquid-generate", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a converted model directory (python -m liquid_dist.convert)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text, or - to read it from stdin")
    src.add_argument("--prompts-file", type=Path, help="one prompt per line; JSON lines out")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: generation_config.json (the decoder length)")
    p.add_argument("--sample", action=argparse.BooleanOptionalAction, default=None,
                   help="sample instead of greedy decoding (default: generation_config.json)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--beams", type=int, default=None, help="beam search width (greedy scoring)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--fill-spans", action="store_true",
                   help="decode the spans of the prompt's <extra_id_N> sentinels (span "
                        "corruption) instead of continuing the text")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch (file mode)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16", "stored"), default=None,
                   help="default: stored precision on GPU, fp32 on CPU")
    args = p.parse_args(argv)

    from liquid_dist.data import Tokenizer
    from liquid_dist.data.tokenizer import DECODER_START_IDS
    from liquid_dist.model import LiquidFoundationModelOptimized

    dtype_name = args.dtype or ("stored" if args.device.startswith("cuda") else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "stored": None}[dtype_name]
    model = LiquidFoundationModelOptimized.from_pretrained(args.model, device=args.device,
                                                           dtype=dtype)
    tok = Tokenizer(Path(args.model) / TOKENIZER_NAME)
    gen = model.generation_config
    given = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample,
             "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
             "num_beams": args.beams}
    gen = gen.updated(**{k: v for k, v in given.items() if v is not None})
    if args.fill_spans:
        gen = gen.updated(decoder_start_token_id=DECODER_START_IDS["span_corruption"],
                          suppress_tokens=())
    model.generation_config = gen
    if gen.num_beams > 1 and gen.do_sample:
        p.error("beam search (--beams) and sampling (--sample) cannot be combined")
    steps = min(gen.max_new_tokens, model.cfg.max_decoder_length)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    options = dict(do_sample=gen.do_sample, temperature=gen.temperature, top_k=gen.top_k,
                   top_p=gen.top_p)
    if args.prompts_file is not None:
        prompts = [line for line in args.prompts_file.read_text(encoding="utf-8").splitlines()
                   if line.strip()]
        texts = generate_batch(model, tok, prompts, max_new_tokens=steps,
                               batch_size=args.batch_size, num_beams=gen.num_beams,
                               generator=generator, **options)
        for prompt, text in zip(prompts, texts, strict=True):
            print(json.dumps({"prompt": prompt, "generated": text}, ensure_ascii=False))
        return 0
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if gen.num_beams > 1:
        print(generate_batch(model, tok, [prompt], max_new_tokens=steps,
                             num_beams=gen.num_beams)[0])
    else:
        stream(model, tok, prompt, sys.stdout, max_new_tokens=steps, generator=generator,
               **options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
