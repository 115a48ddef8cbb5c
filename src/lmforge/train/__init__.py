"""lmforge.train: the one training loop and the pretrain stage.

Modules: config (TrainConfig), optim (optimizers + lr schedules), loader (token windows, packing),
loop (train()), pace (throughput, MFU, time left), checkpoint (exact resume), distributed
(torchrun, DDP/FSDP2, ZeRO-1), observe (TensorBoard, loss.png), pretrain (the stage).
`lmforge.train.pretrain(cfg)` is the stage's public function (it shadows the module name on this
package; import the module's other names with `from lmforge.train.pretrain import
PretrainConfig, build`).
"""

from lmforge.train.config import TrainConfig
from lmforge.train.loop import TrainResult, train
from lmforge.train.pretrain import PretrainConfig, pretrain

__all__ = ["PretrainConfig", "TrainConfig", "TrainResult", "pretrain", "train"]
