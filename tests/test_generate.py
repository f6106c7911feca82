"""python -m liquid_dist.generate on a model converted from a run on the Shakespeare shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_convert import cli, converted

from liquid_dist.data import Tokenizer
from liquid_dist.generate import encode_prompts, generate_batch
from liquid_dist.model import LiquidFoundationModelOptimized


@pytest.mark.slow
def test_generate_prompt_streams_decoded_text() -> None:
    """The text streamed token by token is the greedy continuation decoded at once."""
    prompt = "To be, or not to be"
    proc = cli("liquid_dist.generate", str(converted()), "--prompt", prompt,
               "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = LiquidFoundationModelOptimized.from_pretrained(converted())
    tok = Tokenizer(converted() / "tokenizer.model")
    (continuation,) = generate_batch(model, tok, [prompt], max_new_tokens=12)
    assert proc.stdout == continuation + "\n"


@pytest.mark.slow
def test_generate_reads_the_prompt_from_stdin_and_samples_reproducibly() -> None:
    args = ("liquid_dist.generate", str(converted()), "--prompt", "-", "--sample",
            "--temperature", "0.8", "--top-k", "20", "--top-p", "0.95", "--seed", "3",
            "--max-new-tokens", "12")
    first = cli(*args, stdin="ROMEO: But soft")
    again = cli(*args, stdin="ROMEO: But soft")
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.strip() and first.stdout == again.stdout


@pytest.mark.slow
def test_generate_prompts_file_gives_one_json_line_per_prompt(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("KING HENRY:\n\nWhat light through yonder window breaks\nO\n")
    proc = cli("liquid_dist.generate", str(converted()), "--prompts-file", str(prompts),
               "--beams", "2", "--max-new-tokens", "8", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["KING HENRY:", "What light through yonder window "
                                           "breaks", "O"]
    assert all(r["generated"] for r in rows)


@pytest.mark.slow
def test_batched_greedy_equals_one_prompt_at_a_time() -> None:
    """Padding a prompt in a batch does not change its continuation."""
    model = LiquidFoundationModelOptimized.from_pretrained(converted())
    tok = Tokenizer(converted() / "tokenizer.model")
    prompts = ["Now is the winter of our discontent", "Friends"]
    ids, mask = encode_prompts(tok, prompts, model.cfg.max_encoder_length)
    assert ids[0, -1] == tok.eos_id and not mask[1, -1]
    together = generate_batch(model, tok, prompts, max_new_tokens=10)
    alone = [generate_batch(model, tok, [p], max_new_tokens=10)[0] for p in prompts]
    assert together == alone


@pytest.mark.slow
def test_text_mode_never_writes_a_sentinel_and_fill_spans_decodes_from_the_span_start() -> None:
    """The CLI's two modes are the model's generate with the converted generation config
    (prefix-LM start, sentinels suppressed) and with the span-corruption start and no
    suppression."""
    model = LiquidFoundationModelOptimized.from_pretrained(converted())
    tok = Tokenizer(converted() / "tokenizer.model")
    assert model.generation_config.suppress_tokens == tok.sentinel_ids
    prompt = "To be, <extra_id_0> to be: that is the <extra_id_1>"
    ids, mask = encode_prompts(tok, [prompt], model.cfg.max_encoder_length)

    def expected(**settings) -> str:
        out = model.generate(ids, mask, max_new_tokens=12, eos_token_id=tok.eos_id,
                             **settings)[0, 1:].tolist()
        return tok.decode(out[:out.index(tok.eos_id)] if tok.eos_id in out else out)

    text = cli("liquid_dist.generate", str(converted()), "--prompt", prompt,
               "--max-new-tokens", "12")
    spans = cli("liquid_dist.generate", str(converted()), "--prompt", prompt,
                "--max-new-tokens", "12", "--fill-spans")
    assert text.returncode == spans.returncode == 0, text.stderr[-2000:] + spans.stderr[-2000:]
    assert text.stdout == expected() + "\n" and "<extra_id_" not in text.stdout
    assert spans.stdout == expected(decoder_start_token_id=tok.pad_id, suppress_tokens=()) + "\n"


def test_encode_prompts_keeps_the_last_tokens_and_ends_with_eos() -> None:
    class Tok:
        eos_id, pad_id = 1, 0

        def encode(self, text: str) -> list[int]:
            return [int(w) for w in text.split()]

    ids, mask = encode_prompts(Tok(), ["5 6 7 8 9", "5"], max_len=4)
    assert ids.tolist() == [[7, 8, 9, 1], [5, 1, 0, 0]]
    assert mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert ids.dtype == torch.long
