"""prepare_shards in 4 tasks that SIGKILLs its process group part-way through task RANK.

    python prep_kill_worker.py OUTPUT RANK SETTINGS_JSON INPUT...

The kill comes once task RANK's manifest lists a complete shard and two more
documents were written after it, so a partial shard is on disk: what a
preempted or killed task leaves (tests/test_data_prep.py). Start it in a
session of its own.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from liquid_dist.data.prep import PrepSettings, prepare_shards, run, task_dir_name


def main() -> None:
    out, rank, settings, inputs = (Path(sys.argv[1]), int(sys.argv[2]),
                                   PrepSettings(**json.loads(sys.argv[3])), sys.argv[4:])
    manifest = out / task_dir_name(rank) / "manifest.json"
    build = run.build_pipeline

    def kill_part_way(data, task: int = 0, world_size: int = 1):
        after_shard = 0
        for doc in data:
            yield doc
            if task == rank and json.loads(manifest.read_text())["shards"]:
                after_shard += 1
                if after_shard == 2:
                    os.killpg(0, signal.SIGKILL)  # datatrove's manager process too

    run.build_pipeline = lambda *args: [*build(*args), kill_part_way]
    prepare_shards(inputs, out, settings, tasks=4)


if __name__ == "__main__":
    main()
