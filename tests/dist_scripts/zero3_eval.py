"""2 ranks under ZeRO-3 (default DsConfig): SFT with an eval set evaluated every step (chunked CE through the gathered
head, in eval mode after training steps); writes the eval losses seen on rank 0."""
import json
import os
import sys
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def run(out_dir: str, data: str, ds: bool) -> list[float]:
    from llm_trainer import SFTTrainer
    from llm_trainer.parallel import DsConfig
    from trainer_utils import train_config
    # the same global batch: 2 per rank on 2 ranks, 4 in one process
    cfg = train_config(Path(out_dir), data, eval_file_dataset=[data], eval_interval=1, max_steps=2,
                       batch_size=2 if ds else 4,
                       ds_config=DsConfig() if ds else None, overwrite_output_dir=True)
    tr = SFTTrainer(train_config=cfg)
    losses = [tr.evaluate()["eval_loss"]]
    tr.train()
    losses += [json.loads(line)["eval_loss"] for line in open(Path(out_dir) / "out" / "metrics.jsonl")
               if "eval_loss" in line]
    return losses


if __name__ == "__main__":
    losses = run(sys.argv[1], sys.argv[2], ds=True)
    if int(os.environ["RANK"]) == 0:
        Path(sys.argv[1], "losses.json").write_text(json.dumps(losses))
