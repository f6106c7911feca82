"""The training engine (docs/design.md, docs/training.md).

* :mod:`.entry` — ``pretrain(config_path, overrides, resume=...)``, exit statuses;
* :mod:`.prepare` — the run plan: the config resolved once, before any process group;
  the start point: the checkpoint resumed, verified by the ranks together;
* :mod:`.trainer` — the loop (:class:`Trainer`), NaN skipping, preemption;
* :mod:`.checkpoint` — atomic checkpoints, ``latest``, exact resume;
* :mod:`.schedule`, :mod:`.metrics`, :mod:`.monitor`, :mod:`.signals`, :mod:`.flops`;
* :mod:`.heartbeat`, :mod:`.watchdog` — hang detection under every launcher;
* :mod:`.state` — what a checkpoint keeps of the trainer (:class:`TrainerState`);
* :mod:`.faults` — fault injection, one seam built at entry (the tests' environment variables).

Submodules import DeepSpeed lazily where they can; import what you need from them.
"""
