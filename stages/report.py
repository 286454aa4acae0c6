"""dvc stage `report`: load params once, run pipelines.report, write metrics/report.json."""
from pipelines.common.metrics import write_metrics
from pipelines.params import load_params
from pipelines.report import render_report


def main() -> None:
    params = load_params(stage="report")
    metrics = render_report(params.report, params.pack.data_dir, params.text_tokenizer.out_dir,
                            params.pretrain.plots_path, params.pretrain.masking)
    write_metrics("report", metrics)


if __name__ == "__main__":
    main()
