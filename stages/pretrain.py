"""dvc stage `pretrain`: load params once, run pipelines.pretrain, write metrics/pretrain.json."""
from pipelines.common.metrics import write_metrics
from pipelines.params import load_params
from pipelines.pretrain import run_pretraining


def main() -> None:
    params = load_params(stage="pretrain")
    metrics = run_pretraining(params.pretrain, params.pack.data_dir, params.text_tokenizer.out_dir, params.ray)
    write_metrics("pretrain", metrics)


if __name__ == "__main__":
    main()
