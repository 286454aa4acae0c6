"""dvc stage `text_tokenizer`: load params once, run pipelines.text_tokenizer, write metrics/text_tokenizer.json."""
from pipelines.common.metrics import write_metrics
from pipelines.params import load_params
from pipelines.text_tokenizer import train_text_tokenizer


def main() -> None:
    params = load_params(stage="text_tokenizer")
    metrics = train_text_tokenizer(params.text_tokenizer, params.clean.data_dir, params.ray)
    write_metrics("text_tokenizer", metrics)


if __name__ == "__main__":
    main()
