"""skeleton gc: what no MLflow run, logged model or nightly baseline refers to is listed, and removed on request."""
import json

import pandas as pd
import pytest

from skeleton.io import atomic_dir, file_sha256, locked, write_stage_record


def stage(root, name, inputs=(), **names):
    """A finished stage folder made from `inputs`, whose record names other folders."""
    folder = root / name
    with atomic_dir(folder) as tmp:
        (tmp / "weights.bin").write_text(name * 100)  # distinct contents, distinct manifests
        if "scores" in names:  # a skeleton names its scores in neurons.json
            (tmp / "neurons.json").write_text(json.dumps({"scores": str(names.pop("scores"))}))
    (folder / "inputs.json").write_text(json.dumps([str(p) for p in inputs]))
    write_stage_record(folder, {"path": str(folder), **{k: str(v) for k, v in names.items()}})
    return folder


@pytest.fixture
def store(tmp_path):
    """An artifacts folder and a fresh MLflow store: a sweep's run names a skeleton in its results table, a
    logged model was made from a full model, a third model is only in the nightly baseline; a skeleton, its
    evaluation and a benchmark of it are orphans."""
    import mlflow

    root = tmp_path / "artifacts"
    data = stage(root, "data/d1")
    full = stage(root, "models/m1", data=data)
    scores = stage(root, "scores/c1", data=data, model=full)
    teacher = stage(root, "teacher/t1")
    kept = stage(root, "skeletons/s1", inputs=[teacher], data=data, scores=scores)
    logged = stage(root, "models/m2", data=data)
    probe = stage(root, "probe/p1", inputs=[data])
    orphans = [stage(root, "benchmark/b2", inputs=[full, root / "skeletons/s2"]),
               stage(root, "eval/e2", model=root / "skeletons/s2"), stage(root, "skeletons/s2", data=data)]
    baseline = stage(root, "nightly/baseline")
    results = root / ".prefect-results"
    results.mkdir()
    for name, folder in (("orphan", orphans[0]), ("kept", kept)):
        (results / name).write_text(json.dumps({"metadata": {}, "result": json.dumps({"path": str(folder)})}))

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("gc", artifact_location=(tmp_path / "mlruns").as_uri())
    run = client.create_run(experiment, tags={"skeleton.kind": "sweep"})
    table = tmp_path / "results.parquet"
    pd.DataFrame([{"path": str(kept), "data": str(data)}]).to_parquet(table)
    client.log_artifact(run.info.run_id, str(table))
    client.set_terminated(run.info.run_id)
    client.create_logged_model(experiment, tags={"skeleton.manifest": file_sha256(logged / "manifest.json")})
    return root, uri, orphans, [data, full, scores, teacher, kept, logged, probe, baseline]


def test_lists_then_removes_only_what_nothing_refers_to(store, capsys):
    from tasks.gc import main, unreferenced

    root, uri, orphans, kept = store
    assert unreferenced(root, uri) == []  # all younger than a day: a running sweep's folders look the same
    assert unreferenced(root, uri, min_age_hours=0) == orphans
    with locked(orphans[0]):  # being written right now
        assert unreferenced(root, uri, min_age_hours=0) == orphans[1:]

    args = ["--artifacts", str(root), "--tracking-uri", uri, "--min-age-hours", "0"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert all(str(f) in out.out for f in orphans) and "3 folders" in out.err and "--delete" in out.err
    assert all(f.is_dir() for f in orphans)  # a dry run by default

    assert main([*args, "--delete"]) == 0
    assert not any(f.exists() for f in orphans) and all(f.is_dir() for f in kept)
    assert not (orphans[0].parent / f".{orphans[0].name}.lock").exists()
    assert sorted(p.name for p in (root / ".prefect-results").iterdir()) == ["kept"]  # its record went too
    assert unreferenced(root, uri, min_age_hours=0) == []


def test_bad_min_age(store):
    from tasks.gc import main

    with pytest.raises(SystemExit, match="--min-age-hours must be 0 or more"):
        main(["--min-age-hours", "-1"])
