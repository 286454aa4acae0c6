"""dvc stage `pretrain`: load params once, run pipelines.pretrain, write metrics/pretrain.json."""
from pipelines.metrics import write_metrics
from pipelines.params import load_params


def main() -> None:
    params = load_params()
    raise NotImplementedError("stage pretrain is being built")  # replaced by the stage's owner
    write_metrics("pretrain", {})


if __name__ == "__main__":
    main()
