"""What the Train page offers, named for it: the round's configuration and presets
(:mod:`core.model.train`), where a round would run (:mod:`core.model.device`) and the round
report's comparison (:mod:`core.math.evaluate`). The round itself is :mod:`core.services.rounds`."""
from core.math.evaluate import compare  # noqa: F401
from core.model.device import describe as describe_device, select as select_device  # noqa: F401
from core.model.train import ID_LOSSES, TrainConfig, preset_config, preset_job_config, presets_for  # noqa: F401
