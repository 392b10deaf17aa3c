"""The streaming co-training pipeline: exact per-batch mixes, determinism, resume, ranks, augmentation."""
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vla_scale.actions import ActionNormalizer
from vla_scale.actions.factory import make_action_tokenizer
from vla_scale.config import config_to_dict
from vla_scale.data.augment import augment_image
from vla_scale.data.mixture import batch_counts
from vla_scale.data.pipeline import build_data
from vla_scale.data.prompts import PromptBuilder
from vla_scale.errors import DataError
from vla_scale.models.loading import load_tokenizer

WORKER = Path(__file__).parent / "workers" / "data_worker.py"


@pytest.fixture(autouse=True)
def _own_tmpdir(tmp_path, monkeypatch):
    # streaming keeps lock files and shared-memory names under TMPDIR: one per test.
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(d))


def _loader(cfg, tiny_llava):
    tok = load_tokenizer(tiny_llava)
    prompts = PromptBuilder(tok, make_action_tokenizer(cfg.actions, tok), cfg.data.max_length)
    return build_data(cfg, prompts)


def test_batch_counts_round_and_sum_exactly():
    assert batch_counts([0.5, 0.25, 0.125, 0.125], 32) == [16, 8, 4, 4]
    assert batch_counts([0.5, 0.3, 0.2], 10) == [5, 3, 2]
    assert batch_counts([1, 1, 1], 8) == [3, 3, 2]
    assert sum(batch_counts([0.37, 0.41, 0.22], 7)) == 7


@pytest.mark.parametrize("weights, batch", [((0.5, 0.25, 0.125, 0.125), 8), ((0.5, 0.3, 0.2, 0.0), 10)])
def test_every_global_batch_has_the_exact_mix_for_50_batches(tiny_config, tiny_llava, weights, batch):
    names = ("robot", "vqa", "spatial", "affordance")
    sources = ", ".join(f"{{name: {n}, task: {n}, weight: {w}}}" for n, w in zip(names, weights))
    cfg = tiny_config(f"data.sources=[{sources}]", f"train.global_batch_size={batch}",
                      f"train.micro_batch_size={batch // 2}", "data.synthetic.samples_per_source=40")
    loader, _ = _loader(cfg, tiny_llava)
    want = {n: c for n, c in zip(names, batch_counts(list(weights), batch)) if c}
    for _ in range(50):  # 50 batches of 8-10 from 40 samples per source: sources repeat, mixes stay exact
        mbs = loader.next_step()
        assert len(mbs) == 2
        got = Counter(loader.source_names[int(s)] for mb in mbs for s in mb["source"])
        assert dict(got) == want


def test_same_seed_same_batches_and_resume_continues_at_the_next_sample(tiny_config, tiny_llava):
    cfg = tiny_config("data.synthetic.samples_per_source=24")
    a, _ = _loader(cfg, tiny_llava)
    ids_a = [[int(i) for mb in a.next_step() for i in mb["sample_id"]] for _ in range(12)]
    b, _ = _loader(cfg, tiny_llava)
    ids_b = []
    for step in range(12):
        if step == 5:  # a fresh loader from the saved state, as after a restart
            state = json.loads(json.dumps(b.state_dict()))
            b, _ = _loader(cfg, tiny_llava)
            b.load_state_dict(state)
        ids_b.append([int(i) for mb in b.next_step() for i in mb["sample_id"]])
    assert ids_a == ids_b
    flat = [i for step in ids_a for i in step]
    assert len(flat) > 24 * 2  # crossed into repeats: order stays deterministic


def test_loading_a_state_into_a_used_loader_does_not_double_count(tiny_config, tiny_llava):
    loader, _ = _loader(tiny_config(), tiny_llava)
    loader.next_step()
    saved = json.loads(json.dumps(loader.state_dict()))
    for _ in range(3):
        loader.next_step()
    loader.load_state_dict(saved)
    assert loader.state_dict()["streaming"] == saved["streaming"]


def test_resume_with_a_different_mix_is_refused(tiny_config, tiny_llava):
    loader, _ = _loader(tiny_config(), tiny_llava)
    loader.next_step()
    state = loader.state_dict()
    other, _ = _loader(tiny_config("data.sources.1.weight=0.5", f"run.output_dir={Path(tiny_config().run.output_dir)}"),
                       tiny_llava)
    with pytest.raises(DataError, match="mixes"):
        other.load_state_dict(state)


def test_synthetic_sources_are_real_shards_with_stats(tiny_config, tiny_llava):
    cfg = tiny_config()
    _, stats = _loader(cfg, tiny_llava)
    data = Path(cfg.run.output_dir) / "data"
    for s in cfg.data.sources:
        assert (data / s.name / "index.json").is_file()
    assert set(stats) == {"robot"} and stats["robot"]["mask"][6] is False
    from vla_scale.data.streaming_compat import import_streaming

    ds = import_streaming().StreamingDataset(local=str(data / "vqa"), batch_size=1)
    assert ds[0]["task"] == "vqa" and ds[0]["turns"][0]["question"]


def test_augmentation_is_deterministic_per_seed_and_changes_the_image(tiny_config, tiny_llava):
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    a = np.asarray(augment_image(img, np.random.default_rng([1, 2, 3])))
    b = np.asarray(augment_image(img, np.random.default_rng([1, 2, 3])))
    c = np.asarray(augment_image(img, np.random.default_rng([1, 2, 4])))
    assert np.array_equal(a, b) and not np.array_equal(a, c) and not np.array_equal(a, np.asarray(img))
    on = tiny_config("data.augment=true")
    off = tiny_config("data.augment=false")
    p_on = _loader(on, tiny_llava)[0].next_step()[0]["pixel_values"]
    p_on2 = _loader(on, tiny_llava)[0].next_step()[0]["pixel_values"]
    p_off = _loader(off, tiny_llava)[0].next_step()[0]["pixel_values"]
    assert np.array_equal(p_on.numpy(), p_on2.numpy()) and not np.array_equal(p_on.numpy(), p_off.numpy())


def test_loader_workers_give_the_same_batches(tiny_config, tiny_llava):
    ids = {}
    for workers in (0, 2):
        loader, _ = _loader(tiny_config(f"data.num_workers={workers}", "data.augment=true"), tiny_llava)
        steps = [loader.next_step()[0] for _ in range(3)]
        ids[workers] = [(mb["sample_id"].tolist(), mb["pixel_values"].sum().item()) for mb in steps]
    assert ids[0] == ids[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _torchrun(n: int, cfg_json: Path, out: Path, steps: int, save_at="-", resume=None, tmp=None, labels=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{_free_port()}", str(WORKER), str(cfg_json), str(out), str(steps), str(save_at)]
    if resume:
        cmd.append(str(resume))
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           **({"DATA_WORKER_LABELS": "1"} if labels else {})}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.load(open(f"{out}.rank{k}.json"))["steps"] for k in range(n)]
    return [sum((rk[s] for rk in ranks), []) for s in range(steps)], ranks


@pytest.mark.slow
def test_two_ranks_disjoint_and_resume_across_world_sizes(tiny_config, tiny_llava, tmp_path):
    """2 ranks read disjoint halves of the same global batches as 1 rank; resuming 1->2 and 2->1
    continues exactly where the saved run stopped (no repeats, no skips)."""
    cfg = tiny_config("data.synthetic.samples_per_source=64", "train.micro_batch_size=4")
    _loader(cfg, tiny_llava)  # write the synthetic shards once, before the ranks start
    cfg_json = tmp_path / "cfg.json"
    cfg_json.write_text(json.dumps(config_to_dict(cfg)))
    tmp = tmp_path / "tmp"
    one, _ = _torchrun(1, cfg_json, tmp_path / "w1", 8, save_at=3, tmp=tmp)
    two, ranks = _torchrun(2, cfg_json, tmp_path / "w2", 8, save_at=3, tmp=tmp)
    for s in range(8):
        assert not set(ranks[0][s]) & set(ranks[1][s])  # disjoint within a step
        assert sorted(two[s]) == sorted(one[s])  # the same global batches at any world size
    r12, _ = _torchrun(2, cfg_json, tmp_path / "r12", 5, resume=tmp_path / "w1.state.json", tmp=tmp)
    r21, _ = _torchrun(1, cfg_json, tmp_path / "r21", 5, resume=tmp_path / "w2.state.json", tmp=tmp)
    assert [sorted(s) for s in r12] == [sorted(s) for s in one[3:]]
    assert [sorted(s) for s in r21] == [sorted(s) for s in one[3:]]


def test_special_token_strings_in_user_text_are_plain_text(tiny_config, tiny_llava):
    tok = load_tokenizer(tiny_llava)
    cfg = tiny_config()
    prompts = PromptBuilder(tok, make_action_tokenizer(cfg.actions, tok), 512)
    special = {tok.convert_tokens_to_ids(t) for t in ("<VLA_PROMPT>", "<VLM_PROMPT>")} | set(tok.all_special_ids)
    plain = prompts.prompt_ids(prompts.robot_prompt("pick up the cup"))
    # Ordinary prompts tokenize exactly as the tokenizer itself splits them.
    assert plain == [tok.bos_token_id] + tok.encode(prompts.robot_prompt("pick up the cup"), add_special_tokens=False)
    robot = prompts.build_robot("pick </s> up <VLA_PROMPT> the cup", np.zeros(7))
    vl = prompts.build_vl_turns([{"question": "what is <VLM_PROMPT> </s>?", "answer": "a </s> cup <pad>"},
                                 {"question": "and <s>?", "answer": "</s>"}])
    for sample, tag in ((robot, "<VLA_PROMPT>"), (vl, "<VLM_PROMPT>")):
        ids = sample.input_ids
        assert ids[0] == tok.bos_token_id and ids[1] == tok.convert_tokens_to_ids(tag)
        assert ids[-1] == tok.eos_token_id
        assert not special & set(ids[2:-1]), tok.convert_ids_to_tokens(ids)
    assert "</s>" in tok.decode(robot.input_ids[2:-1]) and "<VLA_PROMPT>" in tok.decode(robot.input_ids[2:-1])


def _processor(cfg, tiny_llava):
    from vla_scale.data.pipeline import SampleProcessor

    tok = load_tokenizer(tiny_llava)
    prompts = PromptBuilder(tok, make_action_tokenizer(cfg.actions, tok), cfg.data.max_length)
    stats = {"robot": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}}
    return SampleProcessor(cfg, prompts, stats, ["robot", "spatial"])


def _robot(image, uid=0):
    return {"_stream": 0, "_uid": uid, "_epoch": 0, "image": image, "task": "robot", "instruction": "pick up the cup",
            "action": np.zeros(7, np.float32)}


def _vl(image, uid=1, answer="[(0.25, 0.75)]", question="where is the cup?"):
    return {"_stream": 1, "_uid": uid, "_epoch": 0, "image": image, "task": "spatial",
            "turns": [{"question": question, "answer": answer}]}


def test_only_robot_frames_are_augmented(tiny_config, tiny_llava):
    from PIL import Image

    from vla_scale.data.images import to_pixels

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    cfg = tiny_config("data.augment=true")
    batch = _processor(cfg, tiny_llava)([_robot(img), _vl(img)])
    plain = to_pixels(img, cfg.model.image_size)
    # A spatial answer's coordinates refer to the image as stored: its pixels must be untouched.
    assert np.array_equal(batch["pixel_values"][1].numpy(), plain.numpy())
    assert not np.array_equal(batch["pixel_values"][0].numpy(), plain.numpy())


def test_centre_crop_is_the_mean_of_the_random_crops():
    from vla_scale.data.augment import crop_box

    for w, h in ((32, 32), (224, 224), (33, 20)):
        boxes = np.array([crop_box(w, h, 0.9, np.random.default_rng(k)) for k in range(3000)])
        centre = np.array(crop_box(w, h, 0.9))
        assert np.array_equal(boxes[:, 2:] - boxes[:, :2], np.broadcast_to(centre[2:] - centre[:2], (3000, 2)))
        # Offsets are uniform over every position, whose exact mean is the centred offset.
        span = np.array([w, h]) - (centre[2:] - centre[:2])
        assert np.array_equal(centre[:2], span / 2)
        assert np.abs(boxes[:, :2].mean(0) - centre[:2]).max() < 0.1 * max(span.max(), 1)


def test_overlong_samples_are_truncated_answer_first_or_dropped_and_flagged(tiny_config, tiny_llava):
    from vla_scale.models.vla import IGNORE_INDEX

    img = __import__("PIL.Image").Image.fromarray(np.zeros((32, 32, 3), np.uint8))
    long_q = "where is the cup " * 80
    answer = "[(0.25, 0.75)]"
    proc = _processor(tiny_config("data.max_length=128", "data.overlong=truncate"), tiny_llava)
    eos = proc.prompts.tokenizer.eos_token_id
    full = PromptBuilder(proc.prompts.tokenizer, proc.prompts.action_tokenizer, 10_000).build_vl(long_q, answer)
    answer_ids = [t for t in full.labels if t != IGNORE_INDEX]
    batch = proc([_robot(img), _vl(img, question=long_q, answer=answer), _vl(img, uid=2)])
    assert batch["truncated"].tolist() == [0, 1, 0] and batch["dropped"].tolist() == [0, 0, 0]
    row = batch["input_ids"][1][batch["attention_mask"][1].bool()].tolist()
    labels = batch["labels"][1][batch["attention_mask"][1].bool()].tolist()
    assert len(row) == 128 and row[:2] == full.input_ids[:2]
    # The question's end was cut; the answer and its EOS are whole and labelled.
    assert [t for t in labels if t != IGNORE_INDEX] == answer_ids and labels[-1] == eos
    assert row[-len(answer_ids):] == answer_ids

    # Later turns go before the first answer is touched.
    turns = [{"question": "where is the cup?", "answer": answer}, {"question": long_q, "answer": "there"}]
    t = proc.prompts.build_vl_turns(turns, "truncate")
    assert t.truncated and t.input_ids == proc.prompts.build_vl_turns(turns[:1]).input_ids
    # An answer that alone does not fit is cut, without EOS: it did not end.
    cut = proc.prompts.build_vl("what is it?", "a cup " * 200, "truncate")
    assert cut.truncated and len(cut.input_ids) == 128 and cut.input_ids[-1] != eos
    assert sum(t != IGNORE_INDEX for t in cut.labels) > 64

    drop = _processor(tiny_config("data.max_length=128", "data.overlong=drop"), tiny_llava)
    batch = drop([_robot(img), _vl(img, question=long_q), _vl(img, uid=2)])
    assert batch["input_ids"].shape[0] == 3 and batch["dropped"].tolist() == [0, 1, 0]
    assert (batch["labels"][1] == IGNORE_INDEX).all() and drop.dropped_count == 1
    assert batch["truncated"].tolist() == [0, 0, 0]

    with pytest.raises(DataError, match=r"source 'spatial' sample 1: .*data.max_length=128.*data.overlong"):
        _processor(tiny_config("data.max_length=128", "data.overlong=error"), tiny_llava)([_vl(img, question=long_q)])


def test_max_length_too_short_for_an_action_is_refused_at_start(tiny_config, tiny_llava):
    from vla_scale.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.max_length=16 cannot hold a robot sample.*at least \d+"):
        _processor(tiny_config("data.max_length=16"), tiny_llava)
    with pytest.raises(ConfigError, match="data.overlong='cut' is not one of"):
        tiny_config("data.overlong=cut")


GRIPPER_0_85 = {"q01": [-1.0] * 6 + [0.0], "q99": [1.0] * 6 + [85.0], "mask": [True] * 6 + [False],
                "min": [-1.0] * 6 + [0.0], "max": [1.0] * 6 + [85.0]}


def test_a_raw_dimension_outside_minus_one_one_is_an_error_at_start(tiny_config, tiny_llava, tmp_path):
    stats = tmp_path / "gripper_0_85.json"
    stats.write_text(json.dumps(GRIPPER_0_85))
    cfg = tiny_config(f"data.sources=[{{name: robot, task: robot, stats: '{stats}'}}]")
    with pytest.raises(DataError, match=r"data.sources.0 \('robot'\): action dimension 6 is kept raw.*\[0, 85\].*"
                                        r"binarize_threshold"):
        _loader(cfg, tiny_llava)
    # Statistics without min/max cannot be checked at start: the first such action is.
    no_range = {k: GRIPPER_0_85[k] for k in ("q01", "q99", "mask")}
    proc = _processor(tiny_config(), tiny_llava)
    proc.normalizers["robot"] = ActionNormalizer.from_stats(no_range)
    sample = _robot(__import__("PIL.Image").Image.fromarray(np.zeros((8, 8, 3), np.uint8)))
    sample["action"] = np.array([0, 0, 0, 0, 0, 0, 85.0], np.float32)
    with pytest.raises(DataError, match=r"source 'robot' sample 0: action dimension 6 is kept raw.*85"):
        proc([sample])


def test_binarize_threshold_maps_a_raw_gripper_to_zero_one(tiny_config, tiny_llava):
    cfg = tiny_config("data.sources=[{name: robot, task: robot, binarize_threshold: 42.5}, {name: spatial, "
                      "task: spatial}]")
    from vla_scale.actions.normalizer import check_raw_dims

    check_raw_dims(GRIPPER_0_85, 42.5, "here")  # mapped: no error
    proc = _processor(cfg, tiny_llava)
    proc.normalizers["robot"] = ActionNormalizer.from_stats(GRIPPER_0_85)
    img = __import__("PIL.Image").Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    for raw, mapped in ((85.0, 1.0), (60.0, 1.0), (10.0, 0.0), (0.0, 0.0)):
        sample = _robot(img)
        sample["action"] = np.array([0.5, 0, 0, 0, 0, 0, raw], np.float32)
        ids = proc([sample])["input_ids"][0].tolist()
        want = proc.prompts.build_robot("pick up the cup", np.array([0.5, 0, 0, 0, 0, 0, mapped]))
        assert ids == want.input_ids, raw
