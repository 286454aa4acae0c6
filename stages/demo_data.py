"""dvc stage `demo_data`: load params once, run pipelines.demo_data, write metrics/demo_data.json."""
from pipelines.metrics import write_metrics
from pipelines.params import load_params


def main() -> None:
    params = load_params()
    raise NotImplementedError("stage demo_data is being built")  # replaced by the stage's owner
    write_metrics("demo_data", {})


if __name__ == "__main__":
    main()
