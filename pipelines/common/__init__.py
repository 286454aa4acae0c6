"""What several stages share: storage (local paths and URIs, atomic writes), typed
config building, the Ray session, stage metrics, remote-output manifests, the shard
schema and shard reader, the exported-model files, seeds, the training-log CSV, the
evaluation data readers and the linear probe. Imports no stage package."""
