"""2 ranks: a main-only callback on rank 0 asks to stop at step 3; both ranks must stop at step 3 together, and a
callback that runs on every rank sees the same events on both. Writes one JSON line per rank."""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main(out_dir: str, data: str) -> None:
    from llm_trainer import Trainer
    from llm_trainer.trainers.callbacks import Callback
    from trainer_utils import train_config

    class StopAt3(Callback):                       # main rank only (the default)
        def on_step_end(self, trainer, control, stats):
            if trainer.global_step == 3:
                control.should_stop = True

    class Record(Callback):
        main_process_only = False

        def __init__(self):
            self.events = []

        def on_step_end(self, trainer, control, stats):
            self.events.append(("step", trainer.global_step))

        def on_train_end(self, trainer, control, results):
            self.events.append(("end", trainer.global_step))

    rec = Record()
    rank = int(os.environ["RANK"])
    from pathlib import Path
    cfg = train_config(Path(out_dir), data, max_steps=8, ds_config=None)
    tr = Trainer(train_config=cfg, callbacks=[StopAt3(), rec])
    tr.train()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"events": rec.events, "step": tr.global_step, "world": tr.backend.world_size}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
