"""dvc stage `pack`: load params once, run pipelines.pack, write metrics/pack.json."""
from pipelines.common.metrics import write_metrics
from pipelines.common.remote_outputs import track_output
from pipelines.pack import pack_shards
from pipelines.params import load_params

# This stage's DVC out (dvc.yaml). With an s3:// out_dir it holds remote.json, the
# manifest of the objects written there (pipelines/common/remote_outputs.py).
TRACKED = "data/shards"


def main() -> None:
    params = load_params()
    metrics = pack_shards(params.pack, params.tokenize.out_dir, params.ray)
    metrics |= track_output(params.pack.out_dir, TRACKED)
    write_metrics("pack", metrics)


if __name__ == "__main__":
    main()
