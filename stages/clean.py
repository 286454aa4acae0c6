"""dvc stage `clean`: load params once, run pipelines.clean, write metrics/clean.json."""
from pipelines.clean import clean_sources
from pipelines.metrics import write_metrics
from pipelines.params import load_params


def main() -> None:
    params = load_params()
    metrics = clean_sources(params.sources, params.clean, params.ray)
    write_metrics("clean", metrics)


if __name__ == "__main__":
    main()
