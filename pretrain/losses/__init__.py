"""Pre-training losses: OIM (re-ID), SimSiam consistency, intra-/inter-task alignment."""
from pretrain.losses.iam import (GradientReversal, InterTaskAlignment, IntraTaskAlignment,
                                 consistency_loss, domain_ce, grad_reverse)
from pretrain.losses.oim import OIMLoss
from pretrain.losses.simsiam import PredictionMLP, negative_cosine, output_std, simsiam_loss

__all__ = ["OIMLoss", "PredictionMLP", "negative_cosine", "simsiam_loss", "output_std",
           "GradientReversal", "grad_reverse", "IntraTaskAlignment", "InterTaskAlignment",
           "domain_ce", "consistency_loss"]
