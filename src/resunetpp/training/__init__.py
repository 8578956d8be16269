"""Training: the settings (`config`), where a run happens (`runtime`), the loop (`loop`), the losses,
distillation from a teacher (`distill`) and the paper's tables (`reproduce`)."""

from resunetpp.training.config import TrainConfig
from resunetpp.training.loop import train

__all__ = ["TrainConfig", "train"]
