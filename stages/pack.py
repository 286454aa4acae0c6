"""dvc stage `pack`: load params once, run pipelines.pack, write metrics/pack.json."""
from pipelines.metrics import write_metrics
from pipelines.pack import pack_shards
from pipelines.params import load_params


def main() -> None:
    params = load_params()
    metrics = pack_shards(params.pack, params.tokenize.out_dir, params.ray)
    write_metrics("pack", metrics)


if __name__ == "__main__":
    main()
