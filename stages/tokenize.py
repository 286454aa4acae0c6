"""dvc stage `tokenize`: load params once, run pipelines.tokenize, write metrics/tokenize.json."""
from pipelines.common.metrics import write_metrics
from pipelines.common.remote_outputs import track_output
from pipelines.params import load_params
from pipelines.tokenize import tokenize_corpus


def main() -> None:
    params = load_params(stage="tokenize")
    cfg = params.tokenize
    metrics = tokenize_corpus(cfg, params.clean.data_dir, params.text_tokenizer.out_dir,
                              params.visual_tokenizer.out_dir, params.ray)
    metrics |= track_output(cfg.data_dir, cfg.out_dir)
    write_metrics("tokenize", metrics)


if __name__ == "__main__":
    main()
