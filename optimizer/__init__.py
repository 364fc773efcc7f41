"""The Entropy-SGD optimizer and its helpers; depends on torch only."""

from optimizer.batchnorm import reestimate_batchnorm
from optimizer.entropy_sgd import EntropySGD

__all__ = ["EntropySGD", "reestimate_batchnorm"]
