"""The labelling loop's side effects: label schema, the queue with leases, decisions with
optimistic concurrency and undo, identity helpers, progress statistics and tracklet context.

Everything goes through :func:`core.data.store.get_dataset` and :func:`core.data.store.db` (pymongo);
the selection math is :mod:`core.math.strategies`.

Collections (one document per item, all keyed by dataset):

``vigil_queues``     one spec per queue (strategy, target, mode, view, batch counter, refill lock)
``vigil_queue``      the queue items: ``status`` pending | leased | done | skipped, ``leased_by``,
                     ``lease_until``, ``served_to`` (every session it was handed to),
                     ``served_token`` (the sample's label state when it was served)
``vigil_leases``     one lease per *sample* (``_id`` "dataset|sample_id"), so two sessions never
                     hold the same sample even when they work on different queues
``vigil_decisions``  append-only log: who, when, before and after values, the model's
                     prediction and whether it agreed, undone flags; a bulk decision (Map page)
                     is one "bulk" entry plus one "bulk_item" entry per sample it changed
``vigil_counters``   atomic counters (fresh identity names)

What "labelled" means (``mode``): ``"verify"`` (default) counts only human decisions
(``labelled_by`` set): identities that arrive with MOT / re-ID data are shown as unverified
suggestions the operator confirms with one click. ``"trust"`` also counts ingested values of the
target field as labels, so only samples without one are queued.

Concurrency: a decision is a compare-and-set on the sample document. Each item carries a token
(a hash of the sample's label fields when it was served); :func:`decide` writes only when the
sample still has that state and otherwise raises :class:`LabelConflict` with both values, so a
decision is never overwritten silently. Bulk decisions (:func:`bulk_decide`, the Map page) go
through the same compare-and-set and bump ``label_version`` too.

Refill: when a lease leaves fewer than ``refill_below`` unserved items, a daemon thread in the
serving process recomputes the next batch (one process at a time, guarded by a lock in the spec
document); when the queue is empty, :func:`next_item` recomputes synchronously.

Modules, each one job (import from here; patch a name in the module that uses it):

``base``         collection names, label fields, errors, database plumbing, label state and tokens
``schema``       the label schema and the labelling round
``vectors``      the active model's vectors (embedding status, loading for queues and predictions)
``queue``        queue specs, batch computation, stored queues, background refill
``leases``       serving items to sessions: per-sample leases, heartbeat, release, closing
``suggestions``  kNN predictions, identity suggestions, similar crops
``decision``     decisions with compare-and-set, bulk decisions, undo, the log; identities, flags
``stats``        progress and model agreement
``strips``       tracklet context (boxes, path, frame strip)
"""
from core.services.labeling.base import (COUNTERS, CONDITION_TAGS, DECISIONS, ITEMS, LABEL_FIELDS, LEASES, QUEUES, TO_LABEL, LabelConflict, LabelingError, describe, sample_state)
from core.services.labeling.schema import (DEFAULT_ATTRIBUTES, DEFAULT_BEHAVIOURS, DEFAULT_CLASSES, MODES, LabelSchema, current_round, label_schema, set_label_schema)
from core.services.labeling.vectors import embedding_status
from core.services.labeling.queue import (TARGETS, Batch, BatchRow, QueueSpec, build_queue, clear_queue, compute_batch, queue_counts, queue_spec, wait_for_refills)
from core.services.labeling.leases import Item, next_item, release, renew
from core.services.labeling.suggestions import neighbours_by_value, predict, similar_crops, suggest_identities
from core.services.labeling.decision import (UNDOABLE, BulkResult, Decision, bulk_decide, decide, decisions, flag, identities, merge_identities, new_identity, record_conflict, undo)
from core.services.labeling.stats import agreement_series, progress
from core.services.labeling.strips import tracklet_path, tracklet_strip
# what the Annotate pages offer: the query strategies and the pair orders
from core.math.strategies import DEFAULT_STRATEGY, DESCRIPTIONS, STRATEGIES  # noqa: F401
from core.math.pair_select import DEFAULT_PAIR_ORDER, PAIR_ORDERS  # noqa: F401
# the identity graph (pure: graph, pair_select) and its pair questions
from core.math import graph, pair_select  # noqa: E402
from core.services.labeling import identity, pairs
