"""dvc stage `clean`: load params once, run pipelines.clean, write metrics/clean.json."""
from pipelines.clean import clean_sources
from pipelines.common.metrics import write_metrics
from pipelines.common.remote_outputs import track_output
from pipelines.params import load_params


def main() -> None:
    params = load_params(stage="clean")
    cfg = params.clean
    metrics = clean_sources(params.sources, cfg, params.ray)
    metrics |= track_output(cfg.data_dir, cfg.out_dir)
    write_metrics("clean", metrics)


if __name__ == "__main__":
    main()
