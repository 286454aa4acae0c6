"""dvc stage `tokenize`: load params once, run pipelines.tokenize, write metrics/tokenize.json."""
from pipelines.metrics import write_metrics
from pipelines.params import load_params
from pipelines.tokenize import tokenize_corpus


def main() -> None:
    params = load_params()
    metrics = tokenize_corpus(params.tokenize, params.clean.out_dir, params.text_tokenizer.out_dir,
                              params.visual_tokenizer.out_dir, params.ray)
    write_metrics("tokenize", metrics)


if __name__ == "__main__":
    main()
