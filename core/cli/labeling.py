"""The ``query`` command of ``python -m core``: print (and optionally store) a labelling batch."""
from __future__ import annotations

import argparse

from core.data import store
from core.math import strategies
from core.services.labeling.base import LabelingError
from core.services.labeling.queue import TARGETS, QueueSpec, build_queue, compute_batch
from core.services.labeling.schema import MODES, label_schema


def cmd_query(a) -> int:
    """``python -m core query --dataset NAME --strategy margin --k 50``: print the batch."""
    import sys

    try:
        spec = QueueSpec(strategy=a.strategy, k=a.k, target=a.target,
                         mode=a.mode or label_schema(a.dataset).mode, boost_conditions=not a.no_boost, seed=a.seed)
        if a.store:
            build_queue(a.dataset, spec=spec)
        batch = compute_batch(a.dataset, spec)
    except (LabelingError, store.StoreError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"# {a.dataset}: {len(batch.rows)} samples by {batch.strategy} (model {batch.version}, "
          f"{batch.n_labelled} labelled, {batch.n_candidates} candidates, target {spec.target}, mode {spec.mode})")
    print(f"{'rank':>4}  {'sample id':<24}  {'score':>7}  {'identity':<18}  {'camera':<12}  path")
    for r in batch.rows:
        print(f"{r.rank + 1:>4}  {r.sample_id:<24}  {r.score:>7.4f}  {str(r.identity or '-'):<18}  "
              f"{str(r.camera or '-'):<12}  {r.filepath}")
        if a.reasons and r.reason:
            print(f"      {r.reason}")
    return 0


def add_commands(subparsers: "argparse._SubParsersAction") -> None:
    """Register ``query`` on the ``python -m core`` subparsers."""
    s = subparsers.add_parser("query", help="print the next labelling batch of a strategy")
    s.add_argument("--dataset", required=True)
    s.add_argument("--strategy", default=strategies.DEFAULT_STRATEGY, choices=sorted(strategies.STRATEGIES))
    s.add_argument("--k", type=int, default=50)
    s.add_argument("--target", default="identity", choices=TARGETS)
    s.add_argument("--mode", choices=MODES, default=None,
                   help="verify: ingested identities are unverified (queued); trust: they count as labels")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-boost", action="store_true", help="do not raise night / shadow / flagged samples")
    s.add_argument("--reasons", action="store_true", help="print why each sample was chosen")
    s.add_argument("--store", action="store_true", help="also append the batch to the shared queue")
    s.set_defaults(fn=cmd_query)
