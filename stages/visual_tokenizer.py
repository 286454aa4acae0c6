"""dvc stage `visual_tokenizer`: load params once, run pipelines.visual_tokenizer, write
metrics/visual_tokenizer.json."""
from pipelines.common.metrics import write_metrics
from pipelines.params import load_params
from pipelines.visual_tokenizer import train_visual_tokenizer


def main() -> None:
    params = load_params(stage="visual_tokenizer")
    metrics = train_visual_tokenizer(params.visual_tokenizer, params.clean.data_dir, params.ray,
                                     params.text_tokenizer.out_dir)
    write_metrics("visual_tokenizer", metrics)


if __name__ == "__main__":
    main()
