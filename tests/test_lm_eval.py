"""lm-evaluation-harness on a converted model through its own `hf` model type (seq2seq
backend), offline, on two local tasks (multiple choice, generate_until), in a process that
cannot import liquid_dist; its scores equal a direct computation with the project's model
and sentencepiece tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_convert import converted

from liquid_dist.data import Tokenizer
from liquid_dist.model import LiquidFoundationModelOptimized

MC = [  # (context, choices, gold)
    ("ROMEO: But soft, what light through yonder", ["window breaks", "door opens", "sky"], 0),
    ("HAMLET: To be, or not to be, that is the", ["question", "answer", "point of it"], 0),
    ("ANTONY: Friends, Romans, lend me your", ["ears", "eyes", "hands"], 0),
    ("GLOUCESTER: Now is the winter of our", ["discontent", "content", "summer made"], 0),
    ("MACBETH: Is this a dagger which I see before", ["me", "thee", "the door"], 0),
]
GEN = [("KING HENRY: Once more unto the breach,", "dear friends"),
       ("HAMLET: Alas, poor Yorick!", "I knew him"),
       ("JULIET: O Romeo, Romeo,", "wherefore art thou Romeo?")]
MAX_GEN_TOKS = 6
UNTIL = "\n"
RUN = r"""
import sys
sys.modules["liquid_dist"] = None  # the harness and the model directory alone
from lm_eval.__main__ import cli_evaluate
sys.argv = ["lm_eval"] + sys.argv[1:]
cli_evaluate()
"""


def write_tasks(root: Path) -> Path:
    """Two local tasks: JSON lines read by the datasets `json` builder, no Hub download."""
    tasks = root / "tasks"
    tasks.mkdir()
    with open(tasks / "mc.jsonl", "w") as fh:
        for ctx, choices, gold in MC:
            fh.write(json.dumps({"question": ctx, "choices": choices, "answer": gold}) + "\n")
    with open(tasks / "gen.jsonl", "w") as fh:
        for prompt, target in GEN:
            fh.write(json.dumps({"prompt": prompt, "target": target}) + "\n")
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (tasks / "liquid_mc.yaml").write_text(
        "task: liquid_mc\n" + common.format(tasks / "mc.jsonl")
        + 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (tasks / "liquid_gen.yaml").write_text(
        "task: liquid_gen\n" + common.format(tasks / "gen.jsonl")
        + 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n'
        f"generation_kwargs:\n  until: [{json.dumps(UNTIL)}]\n  max_gen_toks: {MAX_GEN_TOKS}\n"
        "  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\n")
    return tasks


def samples(out: Path, task: str) -> list[dict]:
    (f,) = out.glob(f"*/samples_{task}_*.jsonl")
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    return sorted(rows, key=lambda r: r["doc_id"])


def loglikelihood(model, tok: Tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context): the encoder reads the context and EOS (as in training),
    the decoder starts with the model's start token and is scored on the continuation."""
    enc = torch.tensor([tok.encode(context) + [tok.eos_id]])
    assert enc.shape[1] <= model.cfg.max_encoder_length  # the harness would cut it on the left
    cont = tok.encode(continuation)
    dec = torch.tensor([[model.cfg.decoder_start_token_id] + cont[:-1]])
    with torch.no_grad():
        logp = F.log_softmax(model(enc, dec).logits.float(), dim=-1)[0]
    return float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum())


@pytest.mark.slow
def test_lm_eval_scores_equal_the_direct_computation(tmp_path: Path) -> None:
    model_dir = converted()
    tasks = write_tasks(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
           "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run(
        [sys.executable, "-c", RUN, "run", "--model", "hf", "--model_args",
         f"pretrained={model_dir},trust_remote_code=True,backend=seq2seq,dtype=float32",
         "--tasks", "liquid_mc,liquid_gen", "--include_path", str(tasks), "--device", "cpu",
         "--batch_size", "2", "--output_path", str(tmp_path / "out"), "--log_samples"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (results_file,) = (tmp_path / "out").glob("*/results_*.json")
    results = json.loads(results_file.read_text())["results"]

    model = LiquidFoundationModelOptimized.from_pretrained(model_dir)
    tok = Tokenizer(model_dir / "tokenizer.model")

    mc = samples(tmp_path / "out", "liquid_mc")
    correct = []
    for row, (ctx, choices, gold) in zip(mc, MC, strict=True):
        got = [float(r[0][0]) for r in row["resps"]]
        want = [loglikelihood(model, tok, ctx, " " + c) for c in choices]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-4), (ctx, got, want)
        correct.append(float(max(range(len(want)), key=want.__getitem__) == gold))
        assert row["acc"] == correct[-1]
    assert results["liquid_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))

    gen = samples(tmp_path / "out", "liquid_gen")
    matches = []
    for row, (prompt, target) in zip(gen, GEN, strict=True):
        ids = tok.encode(prompt) + [tok.eos_id]
        assert len(ids) <= model.cfg.max_encoder_length
        # the harness asks a sequence-to-sequence model for max_length = context + max_gen_toks
        # decoder tokens (its start token included), which the model caps at its maximum
        new = min(len(ids) + MAX_GEN_TOKS - 1, model.cfg.max_decoder_length)
        out = model.generate(torch.tensor([ids]), max_new_tokens=new)
        text = tok.decode(out[0].tolist()).split(UNTIL)[0]
        assert row["filtered_resps"] == [text], (prompt, row["filtered_resps"], text)
        matches.append(float(text == target))
    assert results["liquid_gen"]["exact_match,none"] == pytest.approx(sum(matches) / len(matches))
