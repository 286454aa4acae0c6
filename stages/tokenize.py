"""dvc stage `tokenize`: load params once, run pipelines.tokenize, write metrics/tokenize.json."""
from pipelines.common.metrics import write_metrics
from pipelines.common.remote_outputs import track_output
from pipelines.params import load_params
from pipelines.tokenize import tokenize_corpus

# This stage's DVC out (dvc.yaml). With an s3:// out_dir it holds remote.json, the
# manifest of the objects written there (pipelines/common/remote_outputs.py).
TRACKED = "data/tokenized"


def main() -> None:
    params = load_params()
    metrics = tokenize_corpus(params.tokenize, params.clean.out_dir, params.text_tokenizer.out_dir,
                              params.visual_tokenizer.out_dir, params.ray)
    metrics |= track_output(params.tokenize.out_dir, TRACKED)
    write_metrics("tokenize", metrics)


if __name__ == "__main__":
    main()
