"""benchmarks.code_stats: the statistics behind RESULTS.md's demo pretraining section."""
import numpy as np

from benchmarks.code_stats import perplexity, same_image_mode_accuracy


def test_perplexity_is_the_effective_number_of_codes():
    assert abs(perplexity(np.arange(8).repeat(3)) - 8) < 1e-9
    assert perplexity(np.zeros(10, dtype=np.int64)) == 1.0


def test_same_image_mode_leaves_the_patch_itself_out():
    codes = np.array([[5, 5, 5, 7],     # the 5s are predicted (mode of the others), the 7 is not
                      [1, 2, 3, 4]])    # all ties: the smallest other code, right for none
    assert same_image_mode_accuracy(codes) == 3 / 8
    assert same_image_mode_accuracy(np.array([[3, 3]])) == 1.0
