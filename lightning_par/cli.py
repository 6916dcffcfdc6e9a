"""The ``lightning-par`` command: LightningCLI over the demo GPT and the character corpus.

``lightning-par fit --config recipes/quickstart.yaml`` trains with any strategy registered by ``lightning_par``
(``trainer.strategy: dp``, ...) as well as Lightning's own. The model is the demo GPT unless the config names
another LightningModule (``model: {class_path: lightning_par.demo.hf.HFCausalLM, init_args: ...}``, as
``recipes/hf_llama_*.yaml`` do); it receives the corpus's ``vocab_size`` and the data's ``block_size``.
"""

from __future__ import annotations

from typing import Any

import lightning_par  # noqa: F401  (registers this package's strategy names with Lightning's StrategyRegistry)
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_par.demo import CharDataModule
from lightning_par.strategies.base import leave_without_teardown


class ParCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Any LightningModule with `vocab_size` and `block_size` arguments; the demo GPT when none is named.
        parser.set_defaults({"model": {"class_path": "lightning_par.demo.DemoGPT"}})
        # The vocabulary is a property of the corpus, and the model's context must cover the data's windows.
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.block_size", "model.init_args.block_size")


def build_cli(args: list[str] | dict[str, Any] | None = None, run: bool = True) -> ParCLI:
    return ParCLI(None, CharDataModule, save_config_kwargs={"overwrite": True}, args=args, run=run)


def main(args: list[str] | dict[str, Any] | None = None) -> None:
    # Returns None on purpose: the console script passes main()'s result to sys.exit.
    build_cli(args)
    if _close_process_group():
        # One rank of several, its run finished: see [Note: workers skip interpreter teardown]. Loggers and
        # checkpoints are written by now; a run that failed raised before this point.
        leave_without_teardown()


def _close_process_group() -> bool:
    """Leave the process group together (a barrier, then destroy it), so that no rank closes its sockets under a peer
    still finishing teardown's last collectives. True if this process was one rank of several."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()
    dist.destroy_process_group()
    return True


if __name__ == "__main__":
    main()
