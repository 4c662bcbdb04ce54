"""What the entry points set before they work: `configure()`, called by the `skeleton` command (flows/cli.py) and at
the start of every flow (a deployment's run too). Importing a module of this project never sets any of it.

    environment defaults    what `make` exports (HF offline, no telemetry, Prefect's home and start-up timeout), so
                            `skeleton ...` behaves as `make sweep` does, and no per-model progress bars; an
                            environment that sets one wins
    Prefect                 results stored as plain JSON wherever a task names no serializer of its own; the
                            library's logger ("skeleton") among Prefect's extra loggers, at INFO: training and
                            attribution progress in the flow's logs and the Prefect UI (outside a flow run: the
                            console only)
    MLflow                  telemetry off (the tracking store: tasks.paths.tracking_uri)

Prefect reads its settings when it is first imported: the command configures before it imports Prefect, and a flow
run that starts with Prefect already imported (a deployment's) gets the library's logger attached here.
"""
from __future__ import annotations

import logging
import os
import sys

from tasks.paths import ROOT

LOGGER = "skeleton"  # the library's logger (skeleton/*.py log under it)
ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
               "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "PREFECT_HOME": str(ROOT / ".prefect"),
               "PREFECT_RESULTS_DEFAULT_SERIALIZER": "json", "PREFECT_LOGGING_EXTRA_LOGGERS": LOGGER,
               # the library's records outside a flow run (a command, a test) go to the console, without a warning
               "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
               # no bar per model loaded, saved (transformers) or logged (MLflow): each is under a second, and a
               # default sweep printed 44 lines of them; training and attribution log their own progress
               "HF_HUB_DISABLE_PROGRESS_BARS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def configure() -> None:
    """Set the environment defaults (those not set already) and the library's logger. Idempotent."""
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.INFO)  # Prefect's extra loggers keep their own level: INFO records would not pass
    extra_loggers = os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"].split(",")
    if "prefect.main" in sys.modules and LOGGER in extra_loggers:  # Prefect set up its logging before this ran
        extra = logging.getLogger("prefect.extra")  # what Prefect gives each extra logger it knows at start-up
        logger.handlers += [handler for handler in extra.handlers if handler not in logger.handlers]
