"""One rank of the 2-rank runs of tests/test_distributed.py, started by torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_worker.py MODEL ROOT

1. ROOT/two: the tiny-model run of `trainer(...)` stopped after step 2 (checkpoints at steps 1 and 2);
   each rank saves its adapter to ROOT/two/lora-rank{r}.pt.
2. ROOT/again: a copy of ROOT/two resumed on the same 2 ranks to the end (step 3); each rank saves its adapter.
3. ROOT/dapo: one DAPO step in which rank 1's groups are all uninformative (constant rewards), so it
   keeps none in any round and runs the update with an empty share; rank 0 writes the step's
   metrics to ROOT/dapo/metrics-step0.json, each rank its adapter.
"""

from __future__ import annotations

import json
import shutil
import sys
import zlib
from pathlib import Path

import torch
from conftest import run_config

from qerl.distributed import shutdown
from qerl.rollout import Engine, Rollout
from qerl.trainer import Trainer


class PerPromptEngine(Engine):
    """The reference engine, each prompt sampled with a generator seeded from its own tokens: a prompt's
    completions do not depend on which rank samples it, nor on the other prompts of the batch."""

    def generate(self, prompts, params=None, generator=None) -> Rollout:
        outs = [super(PerPromptEngine, self).generate([p], params, generator=_seeded(p)) for p in prompts]
        return Rollout(
            [p for o in outs for p in o.prompt_ids],
            torch.cat([o.completion_ids for o in outs]),
            torch.cat([o.mask for o in outs]),
            torch.cat([o.logprobs for o in outs]),
            [f for o in outs for f in o.finish_reasons],
            [t for o in outs for t in o.texts],
            outs[0].n,
        )


def _seeded(prompt) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(json.dumps(prompt).encode()))


def digit_reward(completions, golds, lengths, max_len, cfg):
    """The tiny random model never answers correctly: reward its digit count instead."""
    r = [float(sum(ch.isdigit() for ch in c)) for c in completions]
    return r, {"correct": [x > 0 for x in r], "format": [0.0] * len(r), "overlong": [0.0] * len(r)}


def constant_reward(completions, golds, lengths, max_len, cfg):
    r = [1.0] * len(completions)
    return r, {"correct": [True] * len(r), "format": [0.0] * len(r), "overlong": [0.0] * len(r)}


def trainer(model, out, reward_fn=digit_reward, **extra) -> Trainer:
    """The tests' run: 4 prompts x 4 completions a step, token-mean loss, every checkpoint kept, samples fixed per
    prompt."""
    extra.setdefault("rollout", {}).setdefault("prompts_per_step", 4)
    extra.setdefault("algo", {}).setdefault("aggregation", "token_mean")
    extra.setdefault("train", {}).setdefault("keep_checkpoints", 0)
    t = Trainer(run_config(model, out, **extra), progress=False, reward_fn=reward_fn)
    t.engine = PerPromptEngine(t.model, t.tok)
    return t


def lora(t: Trainer) -> dict:
    return {n: p.detach().clone() for n, p in t.model.named_parameters() if ".lora_" in n}


def main(model: str, root: Path):
    t = trainer(model, root / "two")
    t.train(until=2)
    rank = t.world.rank
    torch.save(lora(t), root / "two" / f"lora-rank{rank}.pt")

    if rank == 0:
        shutil.copytree(root / "two", root / "again")
    t.world.gather(None)  # the others wait for the copy
    again = trainer(model, root / "again", train={"resume": True})
    again.train()
    torch.save(lora(again), root / "again" / f"lora-rank{rank}.pt")

    d = trainer(
        model,
        root / "dapo",
        reward_fn=constant_reward if rank == 1 else digit_reward,
        algo={"name": "dapo", "max_sampling_rounds": 2},
    )
    m = d.step(0)
    if rank == 0:
        (root / "dapo" / "metrics-step0.json").write_text(json.dumps(m))
    torch.save(lora(d), root / "dapo" / f"lora-rank{rank}.pt")
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
