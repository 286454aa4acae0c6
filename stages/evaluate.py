"""dvc stage `evaluate`: load params once, run pipelines.evaluate, write metrics/evaluate.json."""
from pipelines.common.metrics import write_metrics
from pipelines.evaluate import evaluate_model
from pipelines.params import load_params


def main() -> None:
    params = load_params(stage="evaluate")
    metrics = evaluate_model(params.evaluate, params.pretrain.out_dir, params.pack.data_dir,
                             params.text_tokenizer.out_dir, params.ray)
    write_metrics("evaluate", metrics)


if __name__ == "__main__":
    main()
