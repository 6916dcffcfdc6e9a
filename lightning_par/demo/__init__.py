from lightning_par.demo.data import CharDataModule
from lightning_par.demo.model import GPT, DemoGPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "DemoGPT", "CharDataModule"]
