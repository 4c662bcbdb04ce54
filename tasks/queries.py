"""MLflow search clauses for the runs a sweep logs (tasks.tracking), one home for each: plain strings, so a module
that must not import MLflow at import time (tasks.results, for `skeleton benchmark`) can use them too.

    client.search_runs([experiment_id], f"{IS_SWEEP} and {IS_FINISHED}")
    tasks.tracking.child_runs(client, parent_run, IS_POINT)
"""
IS_SWEEP = "tags.`skeleton.kind` = 'sweep'"  # a sweep's parent run
IS_POINT = "tags.`skeleton.kind` = 'point'"  # a sweep's skeletons, not its reference (full, fine-tuned) models
IS_REFERENCE = "tags.`skeleton.kind` = 'reference'"
IS_CHOSEN = "tags.`skeleton.chosen` = 'true'"  # the model --max-drop chose (tasks.tracking._chosen)
IS_RUNNING = "attributes.status = 'RUNNING'"
IS_FINISHED = "attributes.status = 'FINISHED'"
