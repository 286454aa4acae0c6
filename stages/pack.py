"""dvc stage `pack`: load params once, run pipelines.pack, write metrics/pack.json."""
from pipelines.common.metrics import write_metrics
from pipelines.common.remote_outputs import track_output
from pipelines.pack import pack_shards
from pipelines.params import load_params


def main() -> None:
    params = load_params(stage="pack")
    cfg = params.pack
    metrics = pack_shards(cfg, params.tokenize.data_dir, params.ray)
    metrics |= track_output(cfg.data_dir, cfg.out_dir)
    write_metrics("pack", metrics)


if __name__ == "__main__":
    main()
