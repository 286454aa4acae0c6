"""dvc stage `clean`: load params once, run pipelines.clean, write metrics/clean.json."""
from pipelines.clean import clean_sources
from pipelines.common.metrics import write_metrics
from pipelines.common.remote_outputs import track_output
from pipelines.params import load_params

# This stage's DVC out (dvc.yaml). With an s3:// out_dir it holds remote.json, the
# manifest of the objects written there (pipelines/common/remote_outputs.py).
TRACKED = "data/clean"


def main() -> None:
    params = load_params()
    metrics = clean_sources(params.sources, params.clean, params.ray)
    metrics |= track_output(params.clean.out_dir, TRACKED)
    write_metrics("clean", metrics)


if __name__ == "__main__":
    main()
