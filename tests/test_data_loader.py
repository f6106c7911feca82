"""Loaders: batch format, packing, equal batches per rank, exact resume, specs, mixing."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from data_fixtures import (
    TMP,
    data_config,
    same_batches,
    shard_dir,
    take_batches,
    tokenizer_path,
)

from liquid_dist.config import ConfigError
from liquid_dist.data import (
    DataError,
    Tokenizer,
    build_train_loader,
    build_val_loader,
    example_shape,
    read_manifest,
)
from liquid_dist.data.tokenizer import DECODER_START_IDS

pytestmark = pytest.mark.timeout(120)


def _shard_documents() -> dict[int, list[int]]:
    docs = {}
    for shard in read_manifest(shard_dir())["shards"]:
        with tarfile.open(shard_dir() / shard["name"]) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".ids.u16"):
                    data = tar.extractfile(m).read()
                    docs[int(m.name.split(".")[0])] = np.frombuffer(data, "<u2").tolist()
    return docs


def test_batches_have_the_model_format():
    tok = Tokenizer(tokenizer_path())
    cfg = data_config()
    loader = build_train_loader(cfg, rank=0, world_size=1, batch_size=4, seed=0)
    shapes = {name: tuple(example_shape(name, encoder_length=64, decoder_length=32,
                                        noise_density=cfg.noise_density,
                                        mean_noise_span_length=cfg.mean_noise_span_length,
                                        max_spans=tok.num_sentinels))[1:]
              for name in ("span_corruption", "prefix_lm")}
    seen = set()
    for batch in take_batches(loader, 12):
        assert set(batch) == {"encoder_input_ids", "encoder_attention_mask",
                              "decoder_input_ids", "labels"}
        enc, mask = batch["encoder_input_ids"], batch["encoder_attention_mask"]
        dec, labels = batch["decoder_input_ids"], batch["labels"]
        shape = (enc.shape[1], dec.shape[1])
        assert shape in shapes.values()
        seen.add(shape)
        assert enc.shape == mask.shape and enc.shape[0] == 4
        assert dec.shape == labels.shape == (4, shape[1])
        assert enc.dtype == dec.dtype == labels.dtype == torch.int64
        assert mask.dtype == torch.bool
        # one objective per batch at its own shape: no padding on either side
        assert mask.all() and (labels != -100).all()
        assert ((enc >= 0) & (enc < tok.vocab_size)).all()
        # the decoder start says which objective: pad for span corruption, bos for prefix LM
        objective = next(name for name, sh in shapes.items() if sh == shape)
        assert (dec[:, 0] == DECODER_START_IDS[objective]).all()
        assert DECODER_START_IDS == {"span_corruption": tok.pad_id, "prefix_lm": tok.bos_id}
        # teacher forcing: the decoder reads label j-1 at position j
        assert torch.equal(dec[:, 1:], labels[:, :-1])
        # every encoder input ends with EOS; span-corruption targets too
        assert (enc[:, -1] == tok.eos_id).all()
        if shape == shapes["span_corruption"]:
            assert (labels[:, -1] == tok.eos_id).all()
    assert seen == set(shapes.values()), "a mixture yields batches of both objectives"
    stats = loader.stats()
    assert stats["encoder_fill"] == stats["decoder_fill"] == 1.0


def test_examples_are_packed_documents_separated_by_eos():
    cfg = data_config(objective="prefix_lm", shuffle_buffer=0)
    loader = build_val_loader(cfg, rank=0, world_size=1, batch_size=4, seed=0)
    streams: list[list[int]] = [[] for _ in range(4)]
    for batch in loader:
        for i in range(4):  # row i of every batch is virtual stream i
            enc = batch["encoder_input_ids"][i][batch["encoder_attention_mask"][i]]
            lab = batch["labels"][i][batch["labels"][i] != -100]
            streams[i] += enc[:-1].tolist() + lab.tolist()  # drop the encoder's appended EOS
    val_keys = {int(k) for k in _val_keys()}
    val_docs = [d for k, d in sorted(_shard_documents().items()) if k in val_keys]
    for i, stream in enumerate(streams):
        # 4 streams, 1 val shard: stream i reads slice i (samples i, i+4, ...) in order,
        # wrapping around: the exact packed stream
        expected: list[int] = []
        while len(expected) < len(stream):
            for d in val_docs[i::4]:
                expected += d + [1]
        assert len(stream) > 0 and stream == expected[: len(stream)], i


def _val_keys() -> list[str]:
    name = next(s["name"] for s in read_manifest(shard_dir())["shards"] if s["split"] == "val")
    with tarfile.open(shard_dir() / name) as tar:
        return [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".json")]


def test_equal_batches_on_two_ranks_with_two_workers_over_three_uneven_shards():
    train = [s for s in read_manifest(shard_dir())["shards"] if s["split"] == "train"]
    assert len(train) == 3 and len({s["documents"] for s in train}) == 3
    cfg = data_config(num_workers=2)
    loaders = [build_train_loader(cfg, rank=r, world_size=2, batch_size=4, seed=3)
               for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) > 2
    counts = [[sum(1 for _ in ld) for _epoch in range(2)] for ld in loaders]
    assert counts == [[len(loaders[0])] * 2] * 2
    first = [next(iter(build_train_loader(cfg, rank=r, world_size=2, batch_size=4, seed=3)))
             for r in range(2)]
    assert not torch.equal(first[0]["encoder_input_ids"], first[1]["encoder_input_ids"])
    # fewer shards than streams (global batch 8): every stream still gets data, no rank hangs
    wide = [build_train_loader(cfg, rank=r, world_size=4, batch_size=2, seed=3)
            for r in range(4)]
    assert len({len(ld) for ld in wide}) == 1
    assert [sum(1 for _ in ld) for ld in wide] == [len(wide[0])] * 4


@pytest.mark.parametrize("stop, shuffle_buffer", [(3, 6), (7, 6), (10, 6), (5, 0), (12, 2)])
def test_resume_continues_the_uninterrupted_stream_exactly(stop, shuffle_buffer):
    cfg = data_config(num_workers=2, batches_per_epoch=7, shuffle_buffer=shuffle_buffer)
    args = {"rank": 1, "world_size": 2, "batch_size": 3, "seed": 11}
    total = 17  # 2 epochs and a half: resume mid-epoch, at the boundary, in epoch 2
    reference = take_batches(build_train_loader(cfg, **args), total)
    first = build_train_loader(cfg, **args)
    before = take_batches(first, stop)
    state = json.loads(json.dumps(first.state_dict()))  # survives JSON
    resumed = build_train_loader(cfg, **args)
    resumed.load_state_dict(state)
    after = take_batches(resumed, total - stop)
    assert same_batches(before + after, reference)
    assert resumed.stats()["batches"] == total
    assert resumed.epoch == total // 7


def test_resume_refuses_a_state_from_another_setup():
    cfg = data_config(num_workers=2, batches_per_epoch=5)
    a = build_train_loader(cfg, rank=1, world_size=2, batch_size=3, seed=11)
    take_batches(a, 2)
    other_rank = build_train_loader(cfg, rank=0, world_size=2, batch_size=3, seed=11)
    with pytest.raises(ValueError, match="lacks streams"):
        other_rank.load_state_dict(a.state_dict())
    other_seed = build_train_loader(cfg, rank=1, world_size=2, batch_size=3, seed=12)
    with pytest.raises(ValueError, match="seed"):
        other_seed.load_state_dict(a.state_dict())
    other_batch = build_train_loader(cfg, rank=1, world_size=2, batch_size=2, seed=11)
    with pytest.raises(ValueError, match="global_batch"):
        other_batch.load_state_dict(a.state_dict())
    other_length = build_train_loader(data_config(num_workers=2, batches_per_epoch=5,
                                                  encoder_length=48),
                                      rank=1, world_size=2, batch_size=3, seed=11)
    with pytest.raises(ValueError, match="encoder_length"):
        other_length.load_state_dict(a.state_dict())
    # the worker count is no part of the data order: another one resumes exactly
    fewer_workers = build_train_loader(data_config(num_workers=1, batches_per_epoch=5), rank=1,
                                       world_size=2, batch_size=3, seed=11)
    fewer_workers.load_state_dict(a.state_dict())
    reference = build_train_loader(cfg, rank=1, world_size=2, batch_size=3, seed=11)
    assert same_batches(take_batches(fewer_workers, 4), take_batches(reference, 6)[2:])


def test_brace_patterns_and_pipe_commands_read_the_same_batches():
    d = shard_dir() / "task-00000"  # a task's directory: its manifest and shards
    common = {"batches_per_epoch": 6, "num_workers": 1}
    specs = [str(d), f"{d}/train-{{000000..000002}}.tar",
             [f"{d}/train-000000.tar", f"{d}/train-00000{{1,2}}.tar"],
             f"pipe:cat {d}/train-{{000000..000002}}.tar"]
    runs = [take_batches(build_train_loader(data_config(train_shards=s, **common), rank=0,
                                        world_size=1, batch_size=2, seed=5), 6)
            for s in specs]
    for other in runs[1:]:
        assert same_batches(runs[0], other)
    with pytest.raises(ConfigError, match="batches_per_epoch"):
        build_train_loader(data_config(train_shards=specs[3]), rank=0, world_size=1,
                           batch_size=2, seed=5)


def test_sources_are_mixed_by_weight_and_counted():
    d = str(shard_dir())
    cfg = data_config(sources=[{"name": "a", "shards": d, "weight": 3.0},
                               {"name": "b", "shards": d, "weight": 1.0}],
                      batches_per_epoch=40, num_workers=2)
    loader = build_train_loader(cfg, rank=0, world_size=1, batch_size=8, seed=1)
    take_batches(loader, 40)
    stats = loader.stats()
    ex = stats["examples_per_source"]
    assert ex["a"] + ex["b"] == 320 == sum(stats["examples_per_objective"].values())
    assert 0.65 < ex["a"] / 320 < 0.85
    assert set(stats["tokens_per_source"]) == {"a", "b"}
    assert stats["tokens_per_source"]["a"] > 2 * stats["tokens_per_source"]["b"]
    assert stats["bad_samples"] == {} and 0 < stats["encoder_fill"] <= 1


def test_validation_yields_the_same_batches_every_pass():
    loader = build_val_loader(data_config(num_workers=2), rank=1, world_size=2, batch_size=2,
                              seed=0, num_batches=4)
    assert len(loader) == 4
    assert same_batches(list(loader), list(loader))


def test_setup_errors_name_the_problem():
    with pytest.raises(ConfigError, match="val_shards"):
        build_val_loader(data_config(val_shards=None), rank=0, world_size=1, batch_size=2,
                         seed=0)
    with pytest.raises(DataError, match="not found"):
        build_train_loader(data_config(train_shards=f"{shard_dir()}/train-000009.tar"),
                           rank=0, world_size=1, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="rank"):
        build_train_loader(data_config(), rank=2, world_size=2, batch_size=2, seed=0)
    unfinished = TMP / "unfinished_shards"
    shutil.copytree(shard_dir(), unfinished, dirs_exist_ok=True)
    manifest = json.loads((unfinished / "manifest.json").read_text())
    (unfinished / "manifest.json").write_text(json.dumps(dict(manifest, complete=False)))
    with pytest.raises(DataError, match="incomplete"):
        build_train_loader(data_config(train_shards=str(unfinished)), rank=0, world_size=1,
                           batch_size=2, seed=0)
