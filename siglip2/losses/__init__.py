"""Training losses: plain nn.Modules returning (scalar loss, dict of detached metrics)."""

from .sigmoid import SigmoidLoss, sigmoid_loss_sums

__all__ = ["SigmoidLoss", "sigmoid_loss_sums"]
