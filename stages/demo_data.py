"""dvc stage `demo_data`: load params once, run pipelines.demo_data, write metrics/demo_data.json."""
from pipelines.common.metrics import write_metrics
from pipelines.demo_data import generate_demo_data
from pipelines.params import load_params


def main() -> None:
    params = load_params(stage="demo_data")
    write_metrics("demo_data", generate_demo_data(params.demo_data))


if __name__ == "__main__":
    main()
