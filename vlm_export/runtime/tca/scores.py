"""The numbers the TCA reservoir ranks and weighs by (spec/tca.md section 3): a prediction's
entropy, the layer weights of the affinity, and the diversity term of the eviction score."""

from __future__ import annotations

import numpy as np

#: the eviction's norm floor, as F.normalize's eps in the released code
_NORMALIZE_EPS = 1e-12


def layer_weights(num_layers: int, tau: float) -> np.ndarray:
    """w = softmax(linspace(0, 1, L) / tau), float64 [L] (spec 3.4)."""
    logits = np.linspace(0.0, 1.0, num_layers) / tau
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def prediction_entropy(logits: np.ndarray) -> float:
    """H = -sum softmax(s) * log_softmax(s), computed in float64."""
    shifted = logits - logits.max()
    log_probs = shifted - np.log(np.exp(shifted).sum())
    return float(-(np.exp(log_probs) * log_probs).sum())


def mean_similarity(units: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Per entry of one class [n], its mean cosine to the class's other entries, from the entries'
    per-layer unit vectors [n, L, D] and norms [n, L].

    Released TCA code (Jo-wang/TCA, utils.py cls_feature_similarity with token_sim=True, as
    called from update_reservoir_sim in runner.py): torch.mean(cls_token_list, dim=0) over ALL
    layers of the raw CLS tokens, then F.normalize, a cosine matrix, and per entry the mean over
    the other entries, (row sum - diagonal) / (n - 1); the eviction score is entropy + that.
    Layer means of the raw tokens are norms @ units / L, entry by entry.
    """
    means = np.matmul(norms[:, None, :], units)[:, 0] / np.float64(units.shape[1])
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), _NORMALIZE_EPS)
    gram = means @ means.T
    return (gram.sum(axis=1) - np.diag(gram)) / (len(units) - 1)
