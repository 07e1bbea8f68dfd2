"""BrierLM as an `evaluate` metric: a thin optional wrapper over `modeling_calm.modeling_calm_brier`.

`evaluate.load("<path>/modeling_calm/metrics/brier_lm")` copies this file into its module cache, so the import
below is absolute: the `modeling_calm` package must be importable (installed, or on PYTHONPATH). Needs the
optional `evaluate` and `datasets` packages (`pip install modeling-calm[eval]`); the model package itself never
imports this file. The file name must equal the folder name for `evaluate.load` to find it.
"""

import datasets
import evaluate
import torch

from modeling_calm.modeling_calm_brier import BRIER_LM_MAX_N, brier_indicators, brier_lm, brier_scores


_DESCRIPTION = """
BrierLM (Shao et al. 2025, Continuous Autoregressive Language Models) evaluates a language model from samples
only. At each position two continuations are sampled independently from the model; Brier-n is the mean over
positions of 1{x1[:n] = y[:n]} + 1{x2[:n] = y[:n]} - 1{x1[:n] = x2[:n]}, an unbiased estimate of the Brier score
2 P(y) - sum_x P(x)^2 of the n-gram distribution. BrierLM = 100 * geometric mean of Brier-1..4, and 0 if any
Brier-n mean is <= 0.
"""

_KWARGS_DESCRIPTION = """
Args:
    sample1 (`list` of `list` of `int`): first sampled continuation at each position (at least max_n tokens).
    sample2 (`list` of `list` of `int`): second, independent sampled continuation at each position.
    references (`list` of `list` of `int`): true continuation at each position (at least max_n tokens).
    max_n (`int`, defaults to 4): largest n-gram order; only the first max_n tokens of each sequence are used.
Returns:
    brier_1 .. brier_{max_n} (`float`): mean Brier-n estimates; brier_lm (`float`): 100 * their geometric mean;
    num_positions (`int`): number of positions.
Examples:
    >>> metric = evaluate.load("modeling_calm/metrics/brier_lm")
    >>> metric.compute(sample1=[[1, 2, 3, 4]], sample2=[[1, 2, 3, 5]], references=[[1, 2, 3, 4]])
    {'brier_1': 1.0, 'brier_2': 1.0, 'brier_3': 1.0, 'brier_4': 1.0, 'brier_lm': 100.0, 'num_positions': 1}
"""

_CITATION = """
@article{shao2025calm,
  title={Continuous Autoregressive Language Models},
  author={Shao, Chenze and others},
  journal={arXiv preprint arXiv:2510.27688},
  year={2025}
}
"""


def _to_tensor(name: str, rows: list, max_n: int) -> torch.Tensor:
    """list of token-id sequences (lengths >= max_n, possibly different) -> LongTensor [num_positions, max_n]."""
    short = [i for i, row in enumerate(rows) if len(row) < max_n]
    if short:
        raise ValueError(
            f"{name}[{short[0]}] has {len(rows[short[0]])} tokens; every continuation needs at least max_n={max_n}."
        )
    return torch.tensor([list(row[:max_n]) for row in rows], dtype=torch.long).reshape(len(rows), max_n)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class BrierLM(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "sample1": datasets.Sequence(datasets.Value("int64")),
                    "sample2": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2510.27688"],
        )

    def _compute(self, sample1, sample2, references, max_n=BRIER_LM_MAX_N):
        if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 1:
            raise ValueError(f"max_n must be an integer >= 1, got {max_n!r}.")
        if not references:
            raise ValueError("BrierLM needs at least one position; got no references.")
        x1 = _to_tensor("sample1", sample1, max_n)
        x2 = _to_tensor("sample2", sample2, max_n)
        y = _to_tensor("references", references, max_n)
        means = brier_scores(brier_indicators(x1, x2, y, max_n=max_n))  # [max_n]
        result = {f"brier_{n + 1}": float(means[n]) for n in range(max_n)}
        result["brier_lm"] = brier_lm(means)
        result["num_positions"] = len(references)
        return result
