"""FiftyOne plugin: Vigil's background jobs as delegated operations.

Queued by :func:`core.data.jobs.submit`, run by ``fiftyone delegated launch`` (``python -m core
worker``), visible in the FiftyOne App's runs list. The operator is a thin shell: the work is in
:func:`core.jobs.worker.run`.
"""
import os
import sys

import fiftyone.operators as foo

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)


class RunJob(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="run_job",
            label="Vigil job",
            unlisted=True,
            allow_immediate_execution=False,
            allow_delegated_execution=True,
            default_choice_to_delegated=True,
        )

    def execute(self, ctx):
        from core.jobs import worker

        return worker.run(ctx)


def register(p):
    p.register(RunJob)
