"""What several stages share: storage (local paths and URIs, atomic writes), typed
config building, the Ray session, stage metrics, remote-output manifests, the shard
schema and shard reader, the exported-model files, seeds, the training-log CSV, the
evaluation data readers and the linear probe. Imports no stage package.

Modules: storage.py, configs.py, ray_session.py, metrics.py, remote_outputs.py, schema.py and
shards.py (shard schema, manifest, reader), task_files.py, seeding.py, train_csv.py, eval_data.py,
linear_probe.py, and dvc_stage.py (the dvc.yaml stage a process runs as, for input checks)."""
