"""One thin module per dvc.yaml stage: load params once, call one pipelines
function, write outputs and metrics."""
