"""A rank of a multi-process data-loader test: read steps, write what was read as JSON.

    torchrun --nproc_per_node N tests/workers/data_worker.py CONFIG_JSON OUT_PREFIX STEPS [SAVE_AT] [RESUME_STATE]

Writes OUT_PREFIX.rank{r}.json: {"steps": [[sample ids of step 0], ...]} (with DATA_WORKER_LABELS=1,
[sample id, digest of its labels] pairs) and,
with SAVE_AT, OUT_PREFIX.state.json (rank 0) after SAVE_AT steps.
"""
import faulthandler
import hashlib
import json
import os
import sys

faulthandler.dump_traceback_later(240, exit=True)  # a hang becomes a failure with a traceback

from vla_scale.actions.factory import make_action_tokenizer  # noqa: E402
from vla_scale.config import config_from_dict  # noqa: E402
from vla_scale.data.pipeline import build_data  # noqa: E402
from vla_scale.data.prompts import PromptBuilder  # noqa: E402
from vla_scale.models.loading import load_tokenizer  # noqa: E402


def main() -> None:
    cfg_path, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    save_at = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] != "-" else None
    resume = sys.argv[5] if len(sys.argv) > 5 else None
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cfg = config_from_dict(json.load(open(cfg_path)))
    tok = load_tokenizer(cfg.model.source)
    prompts = PromptBuilder(tok, make_action_tokenizer(cfg.actions, tok), cfg.data.max_length)
    loader, _ = build_data(cfg, prompts, rank=rank, world_size=world)
    if resume:
        loader.load_state_dict(json.load(open(resume)))
    record = []
    for step in range(steps):
        mbs = loader.next_step()
        ids = [i for mb in mbs for i in mb["sample_id"].tolist()]
        if os.environ.get("DATA_WORKER_LABELS"):  # what each sample is trained on, not only which it is
            ids = [[i, hashlib.sha256(repr(lab[lab != -100].tolist()).encode()).hexdigest()[:16]]
                   for mb in mbs for i, lab in zip(mb["sample_id"].tolist(), mb["labels"])]
        record.append(ids)
        if save_at is not None and step + 1 == save_at and rank == 0:
            json.dump(loader.state_dict(), open(out + ".state.json", "w"))
    json.dump({"steps": record}, open(f"{out}.rank{rank}.json", "w"))


if __name__ == "__main__":
    main()
