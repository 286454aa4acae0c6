"""benchmarks.scatter_memory at toy size: the unit is planned and measured in a fresh process."""
from benchmarks import scatter_memory


def test_scatter_memory_tiny():
    result = scatter_memory.main(["--parts", "3", "--rows-per-part", "50", "--ranges", "4,1"])
    assert result["parts"] == 3 and result["rows"] == 150 and result["decoded_mib"] > 0
    assert result["peak_above_base_mib"] >= 0
