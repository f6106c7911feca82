"""The transformers side of tests/test_hf.py, run in a process that cannot import liquid_dist.

    python tests/hf_remote_worker.py JOBS.json

JOBS.json: a list of {"model": DIR, "probe": PROBE.pt, "out": OUT.pt, "full": bool}.
PROBE.pt holds enc, mask, dec, labels, max_new_tokens, texts; OUT.pt gets what the
transformers classes computed on them (``full`` adds the tokenizer, sampling, beam
search, a save_pretrained round trip and a bf16 / device_map load).
"""

from __future__ import annotations

import json
import sys

sys.modules["liquid_dist"] = None  # the project is not installed where a model is shared

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GenerationMixin,
    PreTrainedModel,
)


def run(job: dict) -> dict:
    probe = torch.load(job["probe"], weights_only=True)
    enc, mask, dec, labels = probe["enc"], probe["mask"], probe["dec"], probe["labels"]
    out: dict = {}
    cfg = AutoConfig.from_pretrained(job["model"], trust_remote_code=True)
    out["config"] = {"class": type(cfg).__name__, "d_model": cfg.hidden_size,
                     "vocab_size": cfg.vocab_size, "ablate": list(cfg.ablate),
                     "num_experts": cfg.moe["num_experts"]}
    model = AutoModelForSeq2SeqLM.from_pretrained(job["model"], trust_remote_code=True)
    assert isinstance(model, PreTrainedModel) and isinstance(model, GenerationMixin)
    assert not model.training
    out["misaligned"] = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
                         if t.data_ptr() % 64]
    with torch.no_grad():
        out["logits"] = model(input_ids=enc, attention_mask=mask, decoder_input_ids=dec).logits
        res = model(input_ids=enc, attention_mask=mask, labels=labels)
        out["loss"], out["aux_loss"] = res.loss, res.aux_loss
        out["labels_logits"] = res.logits
        out["loss_over_items"] = model(input_ids=enc, attention_mask=mask, labels=labels,
                                       num_items_in_batch=100).loss
    out["greedy"] = model.generate(input_ids=enc, attention_mask=mask,
                                   max_new_tokens=probe["max_new_tokens"])
    out["greedy_no_cache"] = model.generate(input_ids=enc, attention_mask=mask, use_cache=False,
                                            max_new_tokens=probe["max_new_tokens"])
    if not job["full"]:
        return out
    torch.manual_seed(0)
    out["sampled"] = model.generate(input_ids=enc, attention_mask=mask, do_sample=True,
                                    top_k=0, max_new_tokens=probe["max_new_tokens"])
    out["beams"] = model.generate(input_ids=enc, attention_mask=mask, num_beams=3,
                                  max_new_tokens=probe["max_new_tokens"])
    # the padding of row 1 moved to its left (as lm-evaluation-harness batches prompts)
    pad = int((~mask[1]).sum())
    left_ids, left_mask = enc.clone(), mask.clone()
    left_ids[1], left_mask[1] = enc[1].roll(pad), mask[1].roll(pad)
    with torch.no_grad():
        out["left_padded_logits"] = model(input_ids=left_ids, attention_mask=left_mask,
                                          decoder_input_ids=dec).logits
    out["left_padded_greedy"] = model.generate(input_ids=left_ids, attention_mask=left_mask,
                                               max_new_tokens=probe["max_new_tokens"])
    tok = AutoTokenizer.from_pretrained(job["model"], trust_remote_code=True)
    out["tokenizer"] = {"fast": tok.is_fast, "ids": [tok(t)["input_ids"] for t in probe["texts"]],
                        "special": [tok.pad_token_id, tok.eos_token_id, tok.unk_token_id,
                                    tok.bos_token_id]}
    again = job["out"] + ".saved"
    model.save_pretrained(again)
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(again, trust_remote_code=True)
    half = AutoModelForSeq2SeqLM.from_pretrained(job["model"], trust_remote_code=True,
                                                 dtype=torch.bfloat16, device_map="cpu")
    with torch.no_grad():
        out["reloaded_logits"] = reloaded(input_ids=enc, attention_mask=mask,
                                          decoder_input_ids=dec).logits
        out["bf16_dtype"] = str(next(half.parameters()).dtype)
        out["bf16_logits"] = half(input_ids=enc, attention_mask=mask,
                                  decoder_input_ids=dec).logits.float()
    return out


def main() -> int:
    try:
        import liquid_dist  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("liquid_dist is importable: the test would prove nothing")
    for job in json.loads(open(sys.argv[1]).read()):
        torch.save(run(job), job["out"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
