"""DiADM (Dombrowski et al., CVPR 2025): a diffusion model conditioned on each training image's own feature vector
(a pseudo-label), trained and sampled at small scale, with the unconditional and class-conditional models it is
compared with. ``train_diadm`` trains (on the training core), ``sample_diadm`` writes a run directory."""

from .model import MECHANISM, MODES, DiadmModel, load
from .sample import SampleResult, sample_diadm
from .train import DiadmOptions, TrainResult, train_diadm, work_folder

__all__ = ["MECHANISM", "MODES", "DiadmModel", "DiadmOptions", "SampleResult", "TrainResult", "load", "sample_diadm",
           "train_diadm", "work_folder"]
